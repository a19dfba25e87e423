"""The garbage collector in our long-running servers (the API, the workers).

What a server allocates before it serves (imported modules: FastAPI, SQLAlchemy, torch,
transformers) stays alive until it exits, yet each full collection walks all of it: 170,000
objects and about 100 ms in an API process, 320,000 and about 190 ms in a worker that has
imported torch (measured on this project's 2-core machine). A burst of requests allocates
enough to start such collections, so each one stopped the API's event loop and its threads,
or a worker's decoding loop, in the middle of the burst. Once a server is ready it moves
what it has so far out of the collector's sight (`gc.freeze`); later full collections walk
only what was allocated since. Reference counting still frees those objects as usual; only
reference cycles among them are never collected, and they were meant to live anyway.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)

_froze_startup = False  # this process manages its heap by freezing (a server, once ready)


def freeze_startup_objects(what: str) -> int:
    """Collect once, then freeze every object still alive (call when `what` is ready to
    serve); returns how many objects the collector now leaves alone."""
    global _froze_startup
    _froze_startup = True
    return _collect_and_freeze(what, "startup objects frozen", unfreeze_first=False)


def freeze_loaded_objects(what: str, *, released: bool = False) -> int:
    """After a server loaded something long-lived (`what`: a model): collect, then freeze
    every object still alive, as at startup. `released`: something loaded before was let go
    since (an evicted model), so everything is unfrozen first and one full collection finds
    its reference cycles. Returns how many objects are frozen now; nothing is done (0) in a
    process that never froze its startup objects (tests, scripts, the CLI)."""
    if not _froze_startup:
        return 0
    return _collect_and_freeze(what, "objects frozen after loading it", unfreeze_first=released)


def _collect_and_freeze(what: str, frozen_what: str, *, unfreeze_first: bool) -> int:
    started = time.perf_counter()
    if unfreeze_first:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info(
        "%s: %d %s out of garbage collection (%.0f ms)",
        what,
        frozen,
        frozen_what,
        (time.perf_counter() - started) * 1000,
    )
    return frozen
