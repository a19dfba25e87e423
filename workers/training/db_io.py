"""TrainingIO backed by the database and the data dir, for one running job."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.datasets import load_dataset_rows
from core.enums import DatasetSchema, EventType, FailureType
from core.errors import PermanentJobError
from core.settings import Settings
from db.datasets import get_dataset
from db.events import append_event
from db.models import Job
from db.session import session_scope
from db.training import add_checkpoint, add_metrics, list_checkpoints
from workers.context import RunContext
from workers.model_refs import inside, resolve_model
from workers.training.io import CheckpointInfo, DatasetRows, MetricPoint, ResolvedModel

logger = logging.getLogger(__name__)


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.data_dir.resolve() / "jobs" / job_id


class DbTrainingIO:
    """Writes go through the job's lease owner check only at the end (the final CAS);
    metrics and checkpoints of an attempt that later loses its lease stay recorded,
    which is what lets the next attempt resume from them."""

    def __init__(self, settings: Settings, ctx: RunContext) -> None:
        self._settings = settings
        self._ctx = ctx
        self.work_dir = job_dir(settings, ctx.job_id)  # created by whoever writes into it

    def _relative(self, path: Path) -> str:
        return str(path.resolve().relative_to(self._settings.data_dir.resolve()))

    def dataset(self, dataset_id: str) -> DatasetRows:
        with session_scope(self._settings.database_url, readonly=True) as session:
            ds = get_dataset(session, dataset_id)
            if ds is None:
                raise PermanentJobError(
                    f"dataset {dataset_id!r} no longer exists", FailureType.INVALID_SPEC
                )
            path, fmt, schema, labels = ds.path, ds.format, ds.schema, list(ds.labels)
        rows = load_dataset_rows(inside(self._settings.data_dir, path), fmt)
        return DatasetRows(id=dataset_id, schema=DatasetSchema(schema), rows=rows, labels=labels)

    def resolve_model(self, ref: str) -> ResolvedModel:
        return resolve_model(self._settings, ref)

    def record_metrics(self, points: Sequence[MetricPoint]) -> None:
        if not points:
            return
        with session_scope(self._settings.database_url) as session:
            add_metrics(
                session, self._ctx.job_id, ((p.step, p.name, p.value, p.epoch) for p in points)
            )

    def record_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        with session_scope(self._settings.database_url) as session:
            add_checkpoint(
                session,
                self._ctx.job_id,
                checkpoint.step,
                self._relative(checkpoint.path),
                dict(checkpoint.metrics),
            )

    def _checkpoints(self, job_id: str) -> list[CheckpointInfo]:
        with session_scope(self._settings.database_url, readonly=True) as session:
            rows = [(c.step, c.path, dict(c.metrics)) for c in list_checkpoints(session, job_id)]
        found = []
        for step, rel, metrics in rows:
            path = inside(self._settings.data_dir, rel)
            if path.is_dir():
                found.append(CheckpointInfo(step=step, path=path, metrics=metrics))
        return found

    def latest_checkpoint(self) -> CheckpointInfo | None:
        found = self._checkpoints(self._ctx.job_id)
        return found[0] if found else None

    def checkpoint_of(self, job_id: str, step: int | None) -> CheckpointInfo:
        for checkpoint in self._checkpoints(job_id):
            if step is None or checkpoint.step == step:
                return checkpoint
        raise PermanentJobError(
            f"job {job_id} has no checkpoint{'' if step is None else f' at step {step}'}",
            FailureType.INVALID_SPEC,
        )

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        with session_scope(self._settings.database_url) as session:
            if session.get(Job, self._ctx.job_id) is not None:
                append_event(session, self._ctx.job_id, EventType.LOG, message, data)
