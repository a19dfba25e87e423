"""What runners return and what a claimed job looks like: the types runners and the
lifecycle share (which runner serves which kind is the lifecycle's choice).

Runners do not record job states: the lifecycle (workers/lifecycle.py) does. A runner that
serves several jobs at once (the generation decode group) gets one `Attempt` per job and
ends each with it; `Claimer` is the part of the lifecycle it uses to take more jobs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.enums import FailureType, FineTuneMethod, FineTuneTask, JobKind, JobStatus
from core.settings import Settings
from db.outputs import OutputRecord
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
    outputs: list[OutputRecord] = field(default_factory=list)
    result: dict[str, Any] | None = None  # stored on the job: eval report, summary figures
    trained_model: TrainedModel | None = None


def discard_model(result: RunResult) -> None:
    """Remove an attempt's saved model directory, which will never be registered."""
    if result.trained_model is not None:
        shutil.rmtree(result.trained_model.path, ignore_errors=True)


@dataclass(frozen=True)
class ClaimedJob:
    kind: JobKind
    spec: dict[str, Any]
    ctx: RunContext  # job id, attempt (the fencing token), worker, stop flags
    model: str | None = None  # generation jobs: the base model they are served on


class Runner(Protocol):
    def run(self, spec: dict[str, Any], ctx: RunContext) -> RunResult: ...


class Attempt(Protocol):
    """One claimed attempt of one job, from its start (heartbeat running) to its end.

    Exactly one of the ending calls is made per attempt; each stops the heartbeat, records
    the outcome with a compare-and-set on the attempt, and returns the status recorded
    (None when nothing was: the attempt had lost the job, or it was handed back)."""

    @property
    def claimed(self) -> ClaimedJob: ...

    def succeed(self, result: RunResult) -> JobStatus | None:
        """Store the result and end `succeeded` (or `cancelled`, when a cancel came first)."""

    def fail(self, failure: FailureType, message: str) -> JobStatus | None:
        """End `failed` with a typed reason, without retrying."""

    def failed(self, exc: BaseException) -> JobStatus | None:
        """End after an exception: classified, then retried (queued) or failed."""

    def stopped(self) -> JobStatus | None:
        """End after the runner stopped on its stop flag: cancelled, timed out, paused,
        handed back, or nothing (lease lost)."""


class Claimer(Protocol):
    """What a runner serving several jobs needs from the lifecycle to take more of them."""

    @property
    def settings(self) -> Settings: ...

    @property
    def device(self) -> str: ...

    @property
    def worker(self) -> str: ...

    def claim_ready(self, kind: JobKind, model: str, limit: int, note: str) -> list[Attempt]:
        """Claim up to `limit` ready jobs of `kind` on `model` at once (no message: a runner
        asked for them) and start their attempts; `note` is each one's event after its claim.
        Jobs another worker has, or that are no longer claimable, are left out."""
