"""Restarting a worker process in place, for a runner that will not stop.

Python cannot kill a thread, so a runner that ignores its stop flag past the grace period
(stuck in a C call, a hung collective, user code that never checks) is stopped by ending
the process that runs it. A solo worker re-executes its own command line (same pid, a
fresh interpreter that reconnects and takes the next job); a prefork pool child exits and
Celery's main process forks a new one. The job's outcome is recorded first
(workers/lifecycle.py); the message of the job in flight is redelivered later and dropped
by the claim, since the job is no longer queued.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

RESTART_EXIT_CODE = 75  # a pool child that ended itself this way is replaced by Celery


def _in_pool_child() -> bool:
    try:
        from billiard.process import current_process  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - billiard comes with Celery
        return False
    name: str = current_process().name
    return name.startswith("ForkPoolWorker")


def restart_process(reason: str) -> None:
    """End this process's work now: exit a pool child, or re-execute a solo worker."""
    logger.critical("restarting this worker process in place: %s", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    if _in_pool_child():
        os._exit(RESTART_EXIT_CODE)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
