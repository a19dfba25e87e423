"""A TrainingIO kept in memory over a temporary directory, for runner tests."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.enums import DatasetSchema, FailureType
from core.errors import PermanentJobError
from workers.context import RunContext
from workers.model_refs import ResolvedModel
from workers.training.io import CheckpointInfo, DatasetRows, MetricPoint


def dataset_id() -> str:
    return f"ds_{uuid.uuid4().hex}"


def job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


@dataclass
class MemoryTrainingIO:
    """Datasets and models registered up front; every write is kept for assertions.

    `checkpoints` maps a job id to its recorded checkpoints, so one instance can
    serve as "another job" for `checkpoint_of` and as this job's history on resume.
    """

    work_dir: Path
    job_id: str = field(default_factory=job_id)
    datasets: dict[str, DatasetRows] = field(default_factory=dict)
    models: dict[str, ResolvedModel] = field(default_factory=dict)
    checkpoints: dict[str, list[CheckpointInfo]] = field(default_factory=dict)
    metric_batches: list[list[MetricPoint]] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any] | None]] = field(default_factory=list)
    pruned: list[Path] = field(default_factory=list)  # checkpoints rotation removed
    closed: bool = False

    def add_dataset(
        self, schema: DatasetSchema, rows: list[dict[str, Any]], labels: list[str] | None = None
    ) -> str:
        new_id = dataset_id()
        self.datasets[new_id] = DatasetRows(
            id=new_id, schema=schema, rows=rows, labels=list(labels or [])
        )
        return new_id

    @property
    def metrics(self) -> list[MetricPoint]:
        return [point for batch in self.metric_batches for point in batch]

    def metric_values(self, name: str) -> list[tuple[int, float]]:
        return [(p.step, p.value) for p in self.metrics if p.name == name]

    @property
    def recorded_checkpoints(self) -> list[CheckpointInfo]:
        return self.checkpoints.get(self.job_id, [])

    def messages(self) -> list[str]:
        return [message for message, _ in self.events]

    def dataset(self, dataset_id: str) -> DatasetRows:
        try:
            return self.datasets[dataset_id]
        except KeyError:
            raise PermanentJobError(
                f"dataset {dataset_id!r} does not exist", FailureType.INVALID_SPEC
            ) from None

    def resolve_model(self, ref: str) -> ResolvedModel:
        return self.models.get(ref, ResolvedModel(ref=ref))

    def record_metrics(self, points: Sequence[MetricPoint]) -> None:
        self.metric_batches.append(list(points))

    def record_checkpoint(self, checkpoint: CheckpointInfo) -> bool:
        self.checkpoints.setdefault(self.job_id, []).append(checkpoint)
        return True

    def _existing(self, job_id: str) -> list[CheckpointInfo]:
        found = [c for c in self.checkpoints.get(job_id, []) if c.path.is_dir()]
        return sorted(found, key=lambda c: c.step, reverse=True)

    def remove_pruned(self, paths: Sequence[Path]) -> None:
        self.pruned.extend(paths)

    def latest_checkpoint(self) -> CheckpointInfo | None:
        found = self._existing(self.job_id)
        return found[0] if found else None

    def checkpoint_of(self, job_id: str, step: int | None) -> CheckpointInfo:
        for checkpoint in self._existing(job_id):
            if step is None or checkpoint.step == step:
                return checkpoint
        raise PermanentJobError(f"job {job_id} has no such checkpoint", FailureType.INVALID_SPEC)

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((message, data))

    def discard_after(self, step: int) -> int:
        furthest = max((p.step for p in self.metrics), default=step)
        self.metric_batches = [
            [p for p in batch if p.step <= step] for batch in self.metric_batches
        ]
        return max(furthest, step)

    def close(self) -> None:
        self.closed = True


class StopAtStep(RunContext):
    """A context whose stop flag goes up once progress reaches `step`, for the reason
    `flag` names (`cancelled` as a cancel would, `lease_lost` as the heartbeat would)."""

    def __init__(self, job_id: str, step: int, flag: str = "cancelled") -> None:
        super().__init__(job_id=job_id, attempt=1, device="cpu")
        self._stop_step = step
        self._flag = flag

    def report_progress(self, fraction: float, **detail: Any) -> None:
        super().report_progress(fraction, **detail)
        if detail.get("step", 0) >= self._stop_step:
            setattr(self, self._flag, True)
            self.stop_event.set()
