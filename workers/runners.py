"""What runners return, and which runner serves which job kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.enums import FailureType, FineTuneMethod, FineTuneTask, JobKind
from core.errors import PermanentJobError
from core.settings import Settings
from db.outputs import GeneratedText
from workers.context import RunContext


@dataclass(frozen=True)
class TrainedModel:
    """A fine-tuned model (or LoRA adapter) directory to register when the job succeeds."""

    path: Path  # absolute; inside the job's work dir
    base_model: str
    task: FineTuneTask
    method: FineTuneMethod
    labels: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    adapter: bool = False  # `path` holds a peft adapter to apply on `base_model`


@dataclass
class RunResult:
    outputs: list[GeneratedText] = field(default_factory=list)
    result: dict[str, Any] | None = None  # stored on the job: eval report, summary figures
    trained_model: TrainedModel | None = None


class Runner(Protocol):
    def run(self, spec: dict[str, Any], ctx: RunContext) -> RunResult: ...


def runner_for(kind: JobKind, settings: Settings) -> Runner:
    """Runners are imported on first use, in the process that runs the job."""
    if kind is JobKind.GENERATE:
        from workers.generation.runner import GenerationRunner

        return GenerationRunner(settings)
    if kind is JobKind.FINETUNE:
        from workers.training.db_io import DbTrainingIO
        from workers.training.runner import FineTuneRunner

        return FineTuneRunner(settings, lambda ctx: DbTrainingIO(settings, ctx))
    if kind is JobKind.PREDICT:
        from workers.training.db_io import DbTrainingIO
        from workers.training.predict import PredictRunner

        return PredictRunner(settings, lambda ctx: DbTrainingIO(settings, ctx))
    if kind is JobKind.NOOP:
        from workers.noop import NoopRunner

        return NoopRunner()
    if kind is JobKind.BATCH:
        from workers.batch.runner import BatchRunner

        return BatchRunner(settings)
    raise PermanentJobError(f"no runner for kind {kind}", FailureType.INVALID_SPEC)
