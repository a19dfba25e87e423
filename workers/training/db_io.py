"""TrainingIO backed by the database and the data dir, for one running attempt."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.datasets import load_dataset_rows
from core.enums import DatasetSchema, EventType, FailureType
from core.errors import PermanentJobError, StaleAttempt, TransientJobError
from core.settings import Settings
from core.storage import artifact_store
from db.datasets import get_dataset
from db.events import append_event
from db.fencing import require_fence
from db.jobs import get_job
from db.session import DATABASE_UNAVAILABLE, session_scope
from db.training import add_checkpoint, add_metrics, discard_metrics_after, list_checkpoints
from workers.context import RunContext
from workers.model_refs import ResolvedModel, inside, resolve_model
from workers.training.checkpoints import last_good_checkpoint, out_of_space
from workers.training.io import CheckpointInfo, DatasetRows, MetricPoint
from workers.training.layout import attempt_dir, job_dir, steps_reached_before

logger = logging.getLogger(__name__)


Write = Callable[[Session], None]


class DbTrainingIO:
    """The outside world of one running attempt: reads from the database and the store,
    and writes (metrics, checkpoint rows, events, the metrics a resume discards) each in a
    transaction that first runs `require_fence` on the attempt number.

    A write the fence refuses (a newer attempt holds the job) is dropped with everything
    still buffered, the attempt is marked as having lost its lease and told to stop, and
    the checkpoints whose rows it could not write are removed from disk and from the
    store. Once the lease is known lost, nothing new is written.

    While the database is unreachable, metrics, checkpoint records and events wait in
    memory, in order, and training goes on; they are written, under the fence, at the next
    write that finds the database back, and at the latest by `close()` (which waits for it
    up to `db_retry_s`)."""

    def __init__(self, settings: Settings, ctx: RunContext) -> None:
        self._settings = settings
        self._ctx = ctx
        self.job_dir = job_dir(settings, ctx.job_id, ctx.tenant_id)
        # created by whoever writes into it
        self.work_dir = attempt_dir(self.job_dir, ctx.attempt)
        self._pending: list[Write] = []
        self._unrecorded: dict[int, Path] = {}  # checkpoints written whose rows are pending
        self._outage_since: float | None = None

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def _write(self, write: Write) -> bool:
        """Queue `write` and drain; True when it is written (under the fence)."""
        if self._ctx.lease_lost:
            return False
        self._pending.append(write)
        return self._drain() and not self._ctx.lease_lost

    def _drain(self) -> bool:
        """Write everything pending in one fenced transaction; False while the database is
        down (it stays pending). A refused transaction is dropped (see `_refused`)."""
        if not self._pending:
            return True
        ctx = self._ctx
        try:
            with session_scope(self._settings.database_url) as session:
                require_fence(session, ctx.job_id, ctx.attempt)
                for write in self._pending:
                    write(session)
                if self._outage_since is not None:
                    outage = time.monotonic() - self._outage_since
                    append_event(
                        session,
                        ctx.job_id,
                        EventType.LOG,
                        f"database was unreachable for {outage:.0f}s; training went on and "
                        f"{len(self._pending)} buffered records were written",
                        {"buffered": len(self._pending), "outage_s": round(outage, 1)},
                    )
        except StaleAttempt:
            self._refused()
            return True
        except DATABASE_UNAVAILABLE as exc:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                logger.warning(
                    "job %s: database unreachable (%s); training goes on, its metrics, "
                    "checkpoint records and events wait in memory",
                    ctx.job_id,
                    type(exc).__name__,
                )
            return False
        if self._outage_since is not None:
            logger.info(
                "job %s: database back after %.0fs; wrote %d buffered records",
                ctx.job_id,
                time.monotonic() - self._outage_since,
                len(self._pending),
            )
            self._outage_since = None
        self._pending.clear()
        self._unrecorded.clear()
        return True

    def _refused(self) -> None:
        ctx = self._ctx
        logger.warning(
            "job %s: write refused, attempt %d no longer holds it; %d records dropped and "
            "%d unrecorded checkpoints removed, stopping",
            ctx.job_id,
            ctx.attempt,
            len(self._pending),
            len(self._unrecorded),
        )
        self._pending.clear()
        self._outage_since = None
        ctx.lease_lost = True
        ctx.stop_event.set()
        self._remove_unrecorded()

    def _remove_unrecorded(self) -> None:
        """This attempt's checkpoints that no row names (and none ever will)."""
        for path in self._unrecorded.values():
            self._remove_checkpoint(path)
        self._unrecorded.clear()

    def _remove_checkpoint(self, path: Path) -> None:
        if not path.resolve().is_relative_to(self.work_dir):
            logger.warning("job %s: %s is not this attempt's; left alone", self._ctx.job_id, path)
            return
        try:
            artifact_store(self._settings).remove(path)
        except Exception as exc:  # the local copy goes anyway; no row names the shared one
            logger.warning("job %s: shared copy of %s not removed: %s", self._ctx.job_id, path, exc)
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        deadline = time.monotonic() + self._settings.db_retry_s
        delay = 0.5
        while not self._drain():
            if time.monotonic() + delay > deadline:
                lost = len(self._pending)
                self._pending.clear()
                self._remove_unrecorded()
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

    def record_checkpoint(self, checkpoint: CheckpointInfo) -> bool:
        if self._ctx.lease_lost:  # saved in the step the lease was lost: no row will name it
            self._remove_checkpoint(checkpoint.path)
            return False
        job_id = self._ctx.job_id
        step, path, metrics = checkpoint.step, self._relative(checkpoint.path), checkpoint.metrics
        # Published under the attempt's own path before its row is written: a resume on
        # another host can fetch it, and no other attempt's files are replaced.
        self._publish_checkpoint(checkpoint)
        self._unrecorded[step] = checkpoint.path

        def write(session: Session) -> None:
            add_checkpoint(session, job_id, step, path, dict(metrics))

        return self._write(write)

    def _publish_checkpoint(self, checkpoint: CheckpointInfo) -> None:
        """Copy a checkpoint to the shared store. One that does not fit there is no good
        checkpoint (no other host could resume from it, and no row will name it): both
        copies are removed and the attempt ends with a transient `disk_full` error naming
        the last good one, as a local save that does not fit does."""
        try:
            artifact_store(self._settings).publish(checkpoint.path)
        except Exception as exc:
            if not out_of_space(exc):
                raise
            self._remove_checkpoint(checkpoint.path)
            last = last_good_checkpoint(checkpoint.path.parent)
            logger.warning(
                "job %s: copying %s to shared storage failed for lack of space: %s",
                self._ctx.job_id,
                checkpoint.path.name,
                exc,
            )
            raise TransientJobError(
                f"no space left copying {checkpoint.path.name} to shared storage ({exc}); "
                f"the last good checkpoint is {last}",
                FailureType.DISK_FULL,
            ) from exc

    def remove_pruned(self, paths: Sequence[Path]) -> None:
        store = artifact_store(self._settings)
        for path in paths:
            if not path.resolve().is_relative_to(self.work_dir):
                logger.warning(
                    "job %s: %s is not this attempt's; left alone", self._ctx.job_id, path
                )
                continue
            try:
                store.remove(path)
            except Exception as exc:  # a stale copy costs space, not correctness
                logger.warning(
                    "job %s: pruned checkpoint %s not removed from shared storage: %s",
                    self._ctx.job_id,
                    self._relative(path),
                    exc,
                )

    def discard_after(self, step: int) -> int:
        ctx = self._ctx
        reached = [step, steps_reached_before(self.job_dir, ctx.attempt) or 0]
        if ctx.lease_lost:
            return max(reached)
        try:
            with session_scope(self._settings.database_url) as session:
                require_fence(session, ctx.job_id, ctx.attempt)
                reached.append(discard_metrics_after(session, ctx.job_id, step))
        except StaleAttempt:
            self._refused()
        return max(reached)

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
        """The newest recorded checkpoint, whichever earlier attempt wrote it (its row was
        written under that attempt's fence). A checkpoint on disk without a row is never
        picked up: a later attempt cannot tell whether the attempt that wrote it still
        held the job (a worker cut off from the database sees an outage exactly while its
        lease runs out and another attempt takes over). The writer itself records it when
        the database answers again (the drain, under its fence); a worker killed during an
        outage loses the steps since its last recorded checkpoint, as a crash between two
        checkpoints does."""
        found = self._checkpoints(self._ctx.job_id)
        return found[0] if found else None

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

        def write(session: Session) -> None:  # the fence found the job's row
            append_event(session, job_id, EventType.LOG, message, data)

        self._write(write)
