"""Runs many generation requests for one model together (first version: one by one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from core.errors import PermanentJobError
from core.settings import Settings
from workers.context import RunContext
from workers.generation.requests import GenerationRequest, RequestResult

FinishedSink = Callable[[RequestResult], None]


def run_requests(
    settings: Settings,
    device: str,
    requests: Sequence[GenerationRequest],
    on_finished: FinishedSink,
) -> None:
    """Run every request; `on_finished` gets each result as soon as it is ready."""
    from workers.generation.runner import GenerationRunner

    runner = GenerationRunner(settings)
    for req in requests:
        ctx = RunContext(job_id=req.key, attempt=1, device=device, stop_event=req.stop_event)
        try:
            result = runner.run(req.spec.model_dump(), ctx)
        except PermanentJobError as exc:
            on_finished(RequestResult(req.key, [], error=exc.message, error_type=exc.failure.value))
            continue
        on_finished(RequestResult(req.key, result.outputs))
