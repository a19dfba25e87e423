"""DbTrainingIO: every write of a running attempt goes through the fence on its attempt
number; a refused write stops the attempt and leaves nothing of it behind; while the
database is unreachable, records wait in memory, in order, and are written once (under the
fence) when it answers again."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.enums import FailureType, JobKind, JobStatus
from core.errors import TransientJobError
from core.settings import Settings
from core.storage import ArtifactStore
from db.attempts import retry_attempt
from db.events import list_events
from db.fencing import current_attempt
from db.jobs import claim
from db.models import Checkpoint, Job, Metric
from db.session import migrate, session_scope
from tests.support.jobs import insert_job
from workers.context import RunContext
from workers.training import db_io
from workers.training.db_io import DbTrainingIO
from workers.training.io import CheckpointInfo, MetricPoint
from workers.training.layout import STEP_MARKER, attempt_dir, job_dir

WORKER = "host-a:1"


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    migrate(database_url)
    return Settings(
        data_dir=Path(tmp_path_factory.mktemp("data")), database_url=database_url, db_retry_s=0
    )


@pytest.fixture
def shared_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The same database and data dir, with a shared artifact store in `tmp_path/store`."""
    return settings.model_copy(update={"storage_url": f"file://{tmp_path / 'store'}"})


class Outage:
    def __init__(self) -> None:
        self.down = False
        self._real = db_io.session_scope

    @contextmanager
    def scope(self, url: str, **kw: Any) -> Iterator[Session]:
        if self.down:
            raise OperationalError("BEGIN", {}, Exception("connection refused"))
        with self._real(url, **kw) as session:
            yield session


def points(*steps: int) -> list[MetricPoint]:
    return [MetricPoint(step=s, name="train_loss", value=1.0 / s) for s in steps]


def claimed(settings: Settings, job_id: str, worker: str = WORKER) -> RunContext:
    """Claim the queued job as `worker`: the context of its new attempt."""
    with session_scope(settings.database_url) as s:
        row = claim(s, job_id, worker, timedelta(seconds=60))
    assert row is not None
    return RunContext(
        job_id=job_id, attempt=row.attempts, device="cpu", tenant_id=row.tenant_id, worker=worker
    )


def new_job(settings: Settings) -> str:
    return insert_job(settings.database_url, kind=JobKind.FINETUNE)


def taken_over(settings: Settings, ctx: RunContext) -> None:
    """Another worker holds the job at the next attempt, as after a lease expired."""
    with session_scope(settings.database_url) as s:
        changed = s.execute(
            update(Job)
            .where(*current_attempt(ctx.job_id, ctx.attempt))
            .values(attempts=ctx.attempt + 1, lease_owner="host-b:2")
        ).rowcount
    assert changed == 1


def requeued(settings: Settings, ctx: RunContext) -> None:
    with session_scope(settings.database_url) as s:
        status = retry_attempt(
            s,
            ctx.job_id,
            attempt=ctx.attempt,
            delay_s=0.0,
            failure=FailureType.WORKER_LOST,
            message="lease expired",
        )
    assert status is JobStatus.QUEUED


def save_checkpoint(io: DbTrainingIO, step: int) -> CheckpointInfo:
    """A checkpoint directory as Trainer leaves it in the attempt's run directory."""
    path = io.work_dir / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    return CheckpointInfo(step=step, path=path)


def metric_steps(settings: Settings, job_id: str) -> list[int]:
    with session_scope(settings.database_url) as s:
        steps = s.scalars(select(Metric.step).where(Metric.job_id == job_id).order_by(Metric.id))
        return list(steps)


def checkpoint_rows(settings: Settings, job_id: str) -> list[tuple[int, str]]:
    with session_scope(settings.database_url) as s:
        rows = s.execute(
            select(Checkpoint.step, Checkpoint.path)
            .where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.step)
        )
        return [(step, path) for step, path in rows]


def messages(settings: Settings, job_id: str) -> list[str]:
    with session_scope(settings.database_url) as s:
        return [e.message for e in list_events(s, job_id)]


def test_each_attempt_writes_under_its_own_directory(settings: Settings) -> None:
    job_id = new_job(settings)
    first = claimed(settings, job_id)
    io = DbTrainingIO(settings, first)
    job = job_dir(settings, job_id, first.tenant_id)
    assert io.work_dir == attempt_dir(job, 1) == job / "attempts" / "1"
    requeued(settings, first)
    assert DbTrainingIO(settings, claimed(settings, job_id)).work_dir == job / "attempts" / "2"


def test_writes_of_an_attempt_that_lost_the_job_are_refused_and_stop_it(
    settings: Settings,
) -> None:
    job_id = new_job(settings)
    ctx = claimed(settings, job_id)
    io = DbTrainingIO(settings, ctx)
    io.record_metrics(points(1))
    first = save_checkpoint(io, 1)
    assert io.record_checkpoint(first)
    assert not ctx.stop_event.is_set()

    taken_over(settings, ctx)
    io.record_metrics(points(2))
    assert ctx.lease_lost and ctx.stop_event.is_set()
    assert ctx.stop_reason == "lease lost"
    io.event("evaluation at step 2", {"eval_loss": 0.5})
    late = save_checkpoint(io, 2)
    assert not io.record_checkpoint(late)
    io.close()

    assert metric_steps(settings, job_id) == [1]
    assert [step for step, _ in checkpoint_rows(settings, job_id)] == [1]
    assert "evaluation at step 2" not in messages(settings, job_id)
    assert first.path.is_dir()  # recorded while the attempt held the job: another resumes it
    assert not late.path.exists()  # saved after the job was lost: no row will ever name it


def test_an_attempt_whose_job_was_requeued_and_claimed_again_writes_nothing(
    settings: Settings,
) -> None:
    job_id = new_job(settings)
    stale_ctx = claimed(settings, job_id)
    stale = DbTrainingIO(settings, stale_ctx)
    requeued(settings, stale_ctx)
    live_ctx = claimed(settings, job_id, "host-b:2")
    live = DbTrainingIO(settings, live_ctx)
    assert live_ctx.attempt == stale_ctx.attempt + 1

    stale.record_metrics(points(7))
    live.record_metrics(points(3))
    live.event("checkpoint at step 3")
    assert stale_ctx.lease_lost and stale_ctx.stop_event.is_set()
    assert not live_ctx.lease_lost and not live_ctx.stop_event.is_set()
    assert metric_steps(settings, job_id) == [3]
    assert "checkpoint at step 3" in messages(settings, job_id)


def test_records_wait_for_the_database_and_are_written_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    outage = Outage()
    monkeypatch.setattr(db_io, "session_scope", outage.scope)
    job_id = new_job(settings)
    io = DbTrainingIO(settings, claimed(settings, job_id))
    io.record_metrics(points(1, 2))
    outage.down = True
    io.record_metrics(points(3, 4))
    io.event("evaluation at step 4", {"eval_loss": 0.5})
    waiting = save_checkpoint(io, 4)
    assert not io.record_checkpoint(waiting)  # its row waits: no rotation yet
    io.record_metrics(points(5))
    assert io.buffered == 4
    outage.down = False
    io.record_metrics(points(6))
    assert io.buffered == 0
    assert metric_steps(settings, job_id) == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in checkpoint_rows(settings, job_id)] == [4]
    assert "evaluation at step 4" in messages(settings, job_id)
    assert any("5 buffered records were written" in m for m in messages(settings, job_id))


def test_records_buffered_in_an_outage_are_refused_when_the_job_moved_on(
    shared_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker cut off from the database trains on while its lease expires and another
    attempt takes the job: what it buffered is refused once the database answers, and the
    checkpoint it published meanwhile is removed from disk and from the store."""
    settings = shared_settings
    outage = Outage()
    monkeypatch.setattr(db_io, "session_scope", outage.scope)
    job_id = new_job(settings)
    ctx = claimed(settings, job_id)
    io = DbTrainingIO(settings, ctx)
    outage.down = True
    io.record_metrics(points(1))
    unrecorded = save_checkpoint(io, 1)
    assert not io.record_checkpoint(unrecorded)
    relative = unrecorded.path.relative_to(settings.data_dir.resolve())
    store = Path(settings.storage_url.removeprefix("file://"))
    assert (store / relative / "model.safetensors").is_file()  # published before its row

    outage.down = False
    taken_over(settings, ctx)
    io.close()
    assert ctx.lease_lost and ctx.stop_event.is_set()
    assert metric_steps(settings, job_id) == [] and checkpoint_rows(settings, job_id) == []
    assert not unrecorded.path.exists()
    assert not (store / relative).exists()


def test_a_checkpoint_the_store_has_no_room_for_ends_the_attempt_disk_full(
    shared_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint saved whole but not copied whole to the shared store is no good one:
    no row names it, both copies go, and the error names the last recorded checkpoint."""
    settings = shared_settings
    job_id = new_job(settings)
    io = DbTrainingIO(settings, claimed(settings, job_id))
    assert io.record_checkpoint(save_checkpoint(io, 1))
    real_publish = ArtifactStore.publish

    def full(store: ArtifactStore, local: Path) -> None:
        real_publish(store, local)  # what was copied before the disk filled up stays behind
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(ArtifactStore, "publish", full)
    second = save_checkpoint(io, 2)
    with pytest.raises(TransientJobError) as failed:
        io.record_checkpoint(second)
    assert failed.value.failure is FailureType.DISK_FULL
    assert "the last good checkpoint is step 1" in str(failed.value)
    relative = second.path.relative_to(settings.data_dir.resolve())
    store = Path(settings.storage_url.removeprefix("file://"))
    assert not second.path.exists() and not (store / relative).exists()
    assert [step for step, _ in checkpoint_rows(settings, job_id)] == [1]


def test_close_gives_up_after_db_retry_s_with_a_transient_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    outage = Outage()
    monkeypatch.setattr(db_io, "session_scope", outage.scope)
    io = DbTrainingIO(settings, claimed(settings, new_job(settings)))
    outage.down = True
    io.record_metrics(points(1))
    unrecorded = save_checkpoint(io, 1)
    io.record_checkpoint(unrecorded)
    with pytest.raises(TransientJobError) as failed:
        io.close()
    assert failed.value.failure is FailureType.DATABASE_UNAVAILABLE
    assert not unrecorded.path.exists()  # no row names it, and the next attempt never reads it


def test_resume_reads_the_newest_recorded_checkpoint_of_an_earlier_attempt(
    settings: Settings,
) -> None:
    job_id = new_job(settings)
    first_ctx = claimed(settings, job_id)
    first = DbTrainingIO(settings, first_ctx)
    for step in (10, 20):
        assert first.record_checkpoint(save_checkpoint(first, step))
    first.record_metrics(points(5, 15, 25))
    (first.work_dir / STEP_MARKER).write_text("27")
    # written by attempt 1 after it lost the job (no row): never picked up
    save_checkpoint(first, 30)
    requeued(settings, first_ctx)

    second_ctx = claimed(settings, job_id)
    second = DbTrainingIO(settings, second_ctx)
    resume = second.latest_checkpoint()
    assert resume is not None and resume.step == 20
    assert resume.path == first.work_dir / "checkpoints" / "checkpoint-20"
    assert second.discard_after(resume.step) == 27  # attempt 1's step marker
    assert metric_steps(settings, job_id) == [5, 15]
    assert not second.work_dir.exists()  # reading a checkpoint copies nothing
    assert not second_ctx.lease_lost


def test_a_resume_that_lost_the_job_discards_nothing(settings: Settings) -> None:
    job_id = new_job(settings)
    ctx = claimed(settings, job_id)
    io = DbTrainingIO(settings, ctx)
    io.record_metrics(points(5, 15))
    taken_over(settings, ctx)
    assert io.discard_after(10) == 10
    assert ctx.lease_lost and ctx.stop_event.is_set()
    assert metric_steps(settings, job_id) == [5, 15]


def test_a_checkpoint_row_names_its_attempts_path(settings: Settings) -> None:
    job_id = new_job(settings)
    ctx = claimed(settings, job_id)
    io = DbTrainingIO(settings, ctx)
    assert io.record_checkpoint(save_checkpoint(io, 4))
    expected = f"tenants/{ctx.tenant_id}/jobs/{job_id}/attempts/1/checkpoints/checkpoint-4"
    assert checkpoint_rows(settings, job_id) == [(4, expected)]
