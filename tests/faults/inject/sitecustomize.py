"""Fault injection for tests/faults, loaded at start by processes whose PYTHONPATH holds this
directory: a no-op job whose duration_s equals MODELYARD_TEST_POISON_DURATION_S kills its
worker process with SIGKILL, as a job that crashes the interpreter every time would."""

from __future__ import annotations

import os
import signal
from typing import Any

_POISON = os.environ.get("MODELYARD_TEST_POISON_DURATION_S")

if _POISON:
    import workers.noop as _noop

    _original_run = _noop.NoopRunner.run

    def _poisoned_run(self: Any, spec: dict[str, Any], ctx: Any) -> Any:
        if float(spec.get("duration_s", 0.0)) == float(_POISON or "nan"):
            os.kill(os.getpid(), signal.SIGKILL)
        return _original_run(self, spec, ctx)

    _noop.NoopRunner.run = _poisoned_run  # type: ignore[method-assign]
