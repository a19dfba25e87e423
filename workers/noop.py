from __future__ import annotations

import time
from typing import Any

from core.specs import NoopSpec
from workers.context import RunContext
from workers.runners import RunResult

_TICK_S = 0.05


class NoopRunner:
    """Waits `duration_s`, reporting progress and honouring cancel; produces nothing."""

    def run(self, spec: dict[str, Any], ctx: RunContext) -> RunResult:
        duration = NoopSpec.model_validate(spec).duration_s
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < duration:
            ctx.check_stop()
            ctx.report_progress(elapsed / duration)
            ctx.stop_event.wait(min(_TICK_S, duration - elapsed))
        ctx.check_stop()
        ctx.report_progress(1.0)
        return RunResult()
