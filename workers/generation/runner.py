"""A generation job run on its own through the engine (in-process use and tests).

Workers serve generation jobs through workers/generation/jobs.py, which lets
other jobs join the batch; this runner is the plain `Runner` form of the same engine.
"""

from __future__ import annotations

from typing import Any

from core.enums import FailureType
from core.errors import PermanentJobError
from core.settings import Settings
from core.specs import GenerateSpec
from workers.context import RunContext
from workers.generation.engine import engine_for
from workers.generation.requests import GenerationRequest, RequestResult
from workers.generation.retrieval import with_retrieval
from workers.runners import RunResult


class GenerationRunner:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def run(self, raw_spec: dict[str, Any], ctx: RunContext) -> RunResult:
        spec, _ = with_retrieval(
            self._settings, GenerateSpec.model_validate(raw_spec), ctx.tenant_id, ctx.device
        )
        engine = engine_for(self._settings, ctx.device)
        base, _ = engine.base_of(spec.model)
        entry, _ = engine.load(base)
        results: list[RequestResult] = []
        request = GenerationRequest(
            key=ctx.job_id,
            spec=spec,
            stop_event=ctx.stop_event,
            on_progress=lambda fraction, detail: ctx.report_progress(fraction, **detail),
        )
        engine.run(entry, [request], results.append)
        (result,) = results
        if result.stopped:
            ctx.check_stop()
        if result.error is not None:
            failure = FailureType(result.error_type or FailureType.RUNTIME_ERROR.value)
            raise PermanentJobError(result.error, failure)
        ctx.report_progress(1.0)
        return RunResult(outputs=result.texts)
