"""What a fine-tuning runner needs from the outside world, as a Protocol.

The database-backed implementation lives in workers/training/db_io.py; tests
use an in-memory one. Paths handed out are absolute; the runner writes only
inside `work_dir`, the attempt's own directory (workers/training/layout.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.enums import DatasetSchema
from workers.model_refs import ResolvedModel


@dataclass(frozen=True)
class DatasetRows:
    """A parsed dataset: rows in the normalized shape of its schema (see core.enums)."""

    id: str
    schema: DatasetSchema
    rows: list[dict[str, Any]]
    labels: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MetricPoint:
    step: int
    name: str  # "train_loss", "learning_rate", "eval_loss", "eval_accuracy", ...
    value: float
    epoch: float | None = None


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path  # a Trainer checkpoint directory (safetensors + optimizer/scheduler state)
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingIO(Protocol):
    work_dir: Path  # this attempt's own directory (checkpoints, step marker, final model)

    def dataset(self, dataset_id: str) -> DatasetRows: ...

    def resolve_model(self, ref: str) -> ResolvedModel: ...

    def record_metrics(self, points: Sequence[MetricPoint]) -> None:
        """Buffered by the caller; one call per batch of points, not per step."""

    def record_checkpoint(self, checkpoint: CheckpointInfo) -> bool:
        """True once its row is written while this attempt holds the job: the caller may
        then remove the attempt's older checkpoints. False while the row waits for the
        database, or when it was refused (the attempt lost the job and must stop)."""

    def remove_pruned(self, paths: Sequence[Path]) -> None:
        """This attempt's checkpoints that rotation (save_total_limit) removed from disk:
        their shared copies go too. Best effort: a failure is logged, never raised."""

    def latest_checkpoint(self) -> CheckpointInfo | None:
        """This job's newest recorded checkpoint (by any earlier attempt) whose directory
        still exists."""

    def checkpoint_of(self, job_id: str, step: int | None) -> CheckpointInfo:
        """Another job's checkpoint (`step` None: its latest), to start from; raises if none."""

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        """A log entry in the job's event stream (evaluations, checkpoints)."""

    def discard_after(self, step: int) -> int:
        """Resuming from a checkpoint at `step`: drop this job's metrics past it (they are
        about to be written again) and return the furthest step the job's earlier attempts
        had reached."""

    def close(self) -> None:
        """Write whatever is still buffered (the database may have been unreachable)."""
