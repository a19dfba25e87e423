"""TrainingIO backed by the database and the data dir, for one running job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.datasets import load_dataset_rows
from core.enums import DatasetSchema, EventType, FailureType
from core.errors import PermanentJobError, TransientJobError
from core.settings import Settings
from core.storage import artifact_store
from db.datasets import get_dataset
from db.events import append_event
from db.jobs import get_job
from db.models import Job
from db.session import DATABASE_UNAVAILABLE, session_scope
from db.training import add_checkpoint, add_metrics, discard_metrics_after, list_checkpoints
from workers.context import RunContext
from workers.model_refs import inside, resolve_model
from workers.training.checkpoints import CHECKPOINTS_DIR, complete_checkpoints
from workers.training.io import CheckpointInfo, DatasetRows, MetricPoint, ResolvedModel

logger = logging.getLogger(__name__)


def job_dir(settings: Settings, job_id: str, tenant_id: str | None = None) -> Path:
    """A job's artifacts (checkpoints, the trained model): under its tenant's directory,
    named by the server-made job id only."""
    root = settings.data_dir.resolve()
    if tenant_id is None:
        return root / "jobs" / job_id
    return root / "tenants" / tenant_id / "jobs" / job_id


Write = Callable[[Session], None]


class DbTrainingIO:
    """Writes go through the job's lease owner check only at the end (the final CAS);
    metrics and checkpoints of an attempt that later loses its lease stay recorded,
    which is what lets the next attempt resume from them.

    While the database is unreachable, metrics, checkpoint records and events wait in
    memory, in order, and training goes on; they are written at the next write that
    finds the database back, and at the latest by `close()` (which waits for it up to
    `db_retry_s`)."""

    def __init__(self, settings: Settings, ctx: RunContext) -> None:
        self._settings = settings
        self._ctx = ctx
        self.work_dir = job_dir(
            settings, ctx.job_id, ctx.tenant_id
        )  # created by whoever writes into it
        self._pending: list[Write] = []
        self._outage_since: float | None = None

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def _write(self, write: Write) -> None:
        self._pending.append(write)
        self._drain()

    def _drain(self) -> bool:
        """Write everything pending in one transaction; False while the database is down."""
        if not self._pending:
            return True
        try:
            with session_scope(self._settings.database_url) as session:
                for write in self._pending:
                    write(session)
                if self._outage_since is not None:
                    outage = time.monotonic() - self._outage_since
                    append_event(
                        session,
                        self._ctx.job_id,
                        EventType.LOG,
                        f"database was unreachable for {outage:.0f}s; training went on and "
                        f"{len(self._pending)} buffered records were written",
                        {"buffered": len(self._pending), "outage_s": round(outage, 1)},
                    )
        except DATABASE_UNAVAILABLE as exc:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                logger.warning(
                    "job %s: database unreachable (%s); training goes on, its metrics, "
                    "checkpoint records and events wait in memory",
                    self._ctx.job_id,
                    type(exc).__name__,
                )
            return False
        if self._outage_since is not None:
            logger.info(
                "job %s: database back after %.0fs; wrote %d buffered records",
                self._ctx.job_id,
                time.monotonic() - self._outage_since,
                len(self._pending),
            )
            self._outage_since = None
        self._pending.clear()
        return True

    def close(self) -> None:
        deadline = time.monotonic() + self._settings.db_retry_s
        delay = 0.5
        while not self._drain():
            if time.monotonic() + delay > deadline:
                lost = len(self._pending)
                self._pending.clear()
                raise TransientJobError(
                    f"database unreachable for {self._settings.db_retry_s:.0f}s; "
                    f"{lost} buffered records not written",
                    FailureType.DATABASE_UNAVAILABLE,
                )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _relative(self, path: Path) -> str:
        return str(path.resolve().relative_to(self._settings.data_dir.resolve()))

    def dataset(self, dataset_id: str) -> DatasetRows:
        with session_scope(self._settings.database_url, readonly=True) as session:
            ds = get_dataset(session, dataset_id, self._ctx.tenant_id)
            if ds is None:
                raise PermanentJobError(
                    f"dataset {dataset_id!r} no longer exists", FailureType.INVALID_SPEC
                )
            path, fmt, schema, labels = ds.path, ds.format, ds.schema, list(ds.labels)
        local = artifact_store(self._settings).fetch(inside(self._settings.data_dir, path))
        rows = load_dataset_rows(local, fmt)
        return DatasetRows(id=dataset_id, schema=DatasetSchema(schema), rows=rows, labels=labels)

    def resolve_model(self, ref: str) -> ResolvedModel:
        return resolve_model(self._settings, ref, self._ctx.tenant_id)

    def record_metrics(self, points: Sequence[MetricPoint]) -> None:
        if not points:
            return
        job_id = self._ctx.job_id
        rows = [(p.step, p.name, p.value, p.epoch) for p in points]
        self._write(lambda session: add_metrics(session, job_id, rows))

    def record_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        job_id = self._ctx.job_id
        step, path, metrics = checkpoint.step, self._relative(checkpoint.path), checkpoint.metrics
        # Published before its row is written: a resume on another host can fetch it.
        artifact_store(self._settings).publish(checkpoint.path)

        def write(session: Session) -> None:
            add_checkpoint(session, job_id, step, path, dict(metrics))

        self._write(write)

    def discard_after(self, step: int) -> int:
        with session_scope(self._settings.database_url) as session:
            return discard_metrics_after(session, self._ctx.job_id, step)

    def _checkpoints(self, job_id: str) -> list[CheckpointInfo]:
        with session_scope(self._settings.database_url, readonly=True) as session:
            rows = [(c.step, c.path, dict(c.metrics)) for c in list_checkpoints(session, job_id)]
        found = []
        for step, rel, metrics in rows:
            path = artifact_store(self._settings).fetch(inside(self._settings.data_dir, rel))
            if path.is_dir():
                found.append(CheckpointInfo(step=step, path=path, metrics=metrics))
        return found

    def latest_checkpoint(self) -> CheckpointInfo | None:
        """The newest of the recorded checkpoints and of those on disk: every checkpoint
        directory is complete (workers/training/checkpoints.py), and one written while the
        database was unreachable may have no row yet; it gets one here."""
        found = self._checkpoints(self._ctx.job_id)
        recorded = found[0] if found else None
        on_disk = complete_checkpoints(self.work_dir / CHECKPOINTS_DIR)
        if on_disk and (recorded is None or on_disk[0][0] > recorded.step):
            step, path = on_disk[0]
            newer = CheckpointInfo(step=step, path=path.resolve())
            self.record_checkpoint(newer)
            return newer
        return recorded

    def checkpoint_of(self, job_id: str, step: int | None) -> CheckpointInfo:
        with session_scope(self._settings.database_url, readonly=True) as session:
            visible = get_job(session, job_id, self._ctx.tenant_id) is not None
        for checkpoint in self._checkpoints(job_id) if visible else []:
            if step is None or checkpoint.step == step:
                return checkpoint
        raise PermanentJobError(
            f"job {job_id} has no checkpoint{'' if step is None else f' at step {step}'}",
            FailureType.INVALID_SPEC,
        )

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        job_id = self._ctx.job_id

        def write(session: Session) -> None:
            if session.get(Job, job_id) is not None:
                append_event(session, job_id, EventType.LOG, message, data)

        self._write(write)
