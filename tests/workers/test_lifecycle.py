"""The lifecycle's outcomes with a stubbed runner, on a real database and Redis.

No-op jobs: generation jobs go through their decode group (tests/workers/test_generation_*.py
and tests/e2e/test_generation_batching.py).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.dispatch import JobPublisher
from core.enums import FailureType, FineTuneMethod, FineTuneTask, JobKind
from core.errors import PermanentJobError, TransientJobError
from core.settings import Settings
from db.base import utcnow
from db.events import list_events
from db.models import Job
from db.outputs import OutputRecord, count_outputs
from db.registry import get_model, model_name
from db.session import migrate, session_scope
from tests.support.jobs import insert_job, load_job
from tests.support.services import redis_db_index
from workers import lifecycle as lifecycle_module
from workers.context import RunContext
from workers.lifecycle import JobLifecycle
from workers.runners import RunResult, TrainedModel


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    migrate(database_url)
    with redis_db_index() as broker:
        yield Settings(
            data_dir=Path(tmp_path_factory.mktemp("data")),
            database_url=database_url,
            broker_url=broker,
            heartbeat_interval_s=0.05,
            retry_backoff_s=60,
        )


@pytest.fixture
def lifecycle(settings: Settings) -> Iterator[JobLifecycle]:
    publisher = JobPublisher(settings)
    yield JobLifecycle(settings, publisher, "cpu")
    publisher.close()


class _StubRunner:
    def __init__(self, behaviour: Any) -> None:
        self._behaviour = behaviour

    def run(self, spec: dict[str, Any], ctx: RunContext) -> RunResult:
        return RunResult(outputs=self._behaviour(ctx))


def stub_runner(monkeypatch: pytest.MonkeyPatch, lifecycle: JobLifecycle, behaviour: Any) -> None:
    monkeypatch.setattr(
        lifecycle_module, "runner_for", lambda kind, settings: _StubRunner(behaviour)
    )


def test_success_writes_outputs_and_finishes(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub_runner(monkeypatch, lifecycle, lambda ctx: [OutputRecord(0, 0, "hi", "stop", 1, 1)])
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.attempts, job.lease_owner) == ("succeeded", 1, None)
    with session_scope(settings.database_url) as s:
        assert count_outputs(s, job_id) == 1
    lifecycle.execute(job_id)  # a late duplicate delivery changes nothing
    with session_scope(settings.database_url) as s:
        assert count_outputs(s, job_id) == 1
        assert "delivery dropped" in list_events(s, job_id)[-1].message


def test_transient_error_requeues_with_backoff_then_fails_at_max(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    def flaky(ctx: RunContext) -> list[OutputRecord]:
        raise TransientJobError("device busy")

    stub_runner(monkeypatch, lifecycle, flaky)
    job_id = insert_job(settings.database_url, max_attempts=2, kind=JobKind.NOOP)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.attempts, job.error_type) == ("queued", 1, "transient_error")
    assert job.available_at > utcnow()
    lifecycle.execute(job_id)  # not due yet: dropped, nothing runs
    assert load_job(settings.database_url, job_id).attempts == 1
    with session_scope(settings.database_url) as s:
        s.query(Job).filter(Job.id == job_id).update({"available_at": utcnow()})
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.attempts, job.error_type) == ("failed", 2, "transient_error")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (PermanentJobError("oom", FailureType.OUT_OF_MEMORY), "out_of_memory"),
        (RuntimeError("boom"), "runtime_error"),
    ],
)
def test_other_errors_fail_once_with_a_type(
    settings: Settings,
    lifecycle: JobLifecycle,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    expected: str,
) -> None:
    def broken(ctx: RunContext) -> list[OutputRecord]:
        raise error

    stub_runner(monkeypatch, lifecycle, broken)
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.attempts, job.error_type) == ("failed", 1, expected)


def test_failure_to_store_results_fails_the_job(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    dup = OutputRecord(0, 0, "same position twice", "stop", 1, 1)
    stub_runner(monkeypatch, lifecycle, lambda ctx: [dup, dup])
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.error_type) == ("failed", "runtime_error")
    with session_scope(settings.database_url) as s:
        assert count_outputs(s, job_id) == 0


def test_cancel_seen_by_heartbeat_cancels(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    from db.jobs import request_cancel

    def wait_for_cancel(ctx: RunContext) -> list[OutputRecord]:
        with session_scope(settings.database_url) as s:
            request_cancel(s, ctx.job_id, tenant_id=None)
        assert ctx.stop_event.wait(5)
        ctx.check_stop()
        return []

    stub_runner(monkeypatch, lifecycle, wait_for_cancel)
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.attempts) == ("cancelled", 1)


def set_columns(settings: Settings, job_id: str, **values: Any) -> None:
    with session_scope(settings.database_url) as s:
        s.query(Job).filter(Job.id == job_id).update(values)


def wait_to_be_stopped(ctx: RunContext) -> list[OutputRecord]:
    assert ctx.stop_event.wait(5)
    ctx.check_stop()
    return []


def test_run_time_limit_stops_the_job_as_timed_out(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub_runner(monkeypatch, lifecycle, wait_to_be_stopped)
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    set_columns(settings, job_id, max_runtime_s=0.1)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.error_type, job.attempts) == ("failed", "timed_out", 1)
    assert "0.1s" in (job.error_message or "")


def test_worker_shutdown_hands_the_job_back_without_spending_an_attempt(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.broker_scan import Presence
    from workers.context import give_back_running

    def shut_down(ctx: RunContext) -> list[OutputRecord]:
        assert give_back_running() == [ctx.job_id]
        return wait_to_be_stopped(ctx)

    stub_runner(monkeypatch, lifecycle, shut_down)
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.attempts, job.max_attempts, job.handbacks, job.lease_owner) == (
        "queued",
        1,
        3,
        1,
        None,
    )
    assert job.error_type is None
    publisher = JobPublisher(settings)
    assert publisher.messages().presence(job_id) is Presence.QUEUED  # published
    publisher.close()
    with session_scope(settings.database_url) as s:
        last = list_events(s, job_id)[-1]
        assert last.data["by"] == lifecycle.worker and "given back" in last.message


def test_named_transient_errors_requeue_with_their_type(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_gone(ctx: RunContext) -> list[OutputRecord]:
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    stub_runner(monkeypatch, lifecycle, database_gone)
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.error_type) == ("queued", "database_unavailable")
    backoff = (job.available_at - utcnow()).total_seconds()
    assert 0 < backoff <= settings.retry_backoff_s  # jitter only ever shortens it


def test_message_for_a_job_past_expires_at_expires_it(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub_runner(monkeypatch, lifecycle, lambda ctx: [])
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    set_columns(settings, job_id, expires_at=utcnow() - timedelta(seconds=1))
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.error_type, job.attempts, job.started_at) == (
        "expired",
        "expired",
        0,
        None,
    )


def test_generation_job_keeps_its_lease_while_its_decode_group_loads_the_model(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.generation import jobs as generation_jobs
    from workers.reconciler import reconcile

    short = settings.model_copy(update={"lease_ttl_s": 0.3})
    publisher = JobPublisher(short)
    lifecycle = JobLifecycle(short, publisher, "cpu")
    seen: dict[str, Any] = {}

    def slow_model_load(self: Any) -> None:
        time.sleep(1.0)  # a cold model load, longer than the lease TTL
        seen["report"] = reconcile(short, publisher)
        seen["job"] = load_job(short.database_url, self._first.claimed.ctx.job_id)

    monkeypatch.setattr(generation_jobs.DecodeGroupRun, "run", slow_model_load)
    try:
        job_id = insert_job(short.database_url)
        lifecycle.execute(job_id)
    finally:
        publisher.close()
    assert seen["report"].requeued == 0
    assert (seen["job"].status, seen["job"].lease_owner) == ("running", lifecycle.worker)


def request_cancel_now(settings: Settings, job_id: str) -> None:
    from db.jobs import request_cancel

    with session_scope(settings.database_url) as s:
        request_cancel(s, job_id, tenant_id=None)


@pytest.mark.parametrize("outputs", [1, 0], ids=["fenced_outputs", "nothing_to_write"])
def test_a_cancel_asked_before_the_finish_commits_wins(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch, outputs: int
) -> None:
    # With nothing to write there is no fence before the ending: its own compare-and-set
    # finds the cancel and records `cancelled`, not a lost attempt.
    def finish_fast(ctx: RunContext) -> list[OutputRecord]:
        request_cancel_now(settings, ctx.job_id)  # the heartbeat never sees it
        return [OutputRecord(0, 0, "done", "stop", 1, 1)][:outputs]

    stub_runner(monkeypatch, lifecycle, finish_fast)
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.result, job.lease_owner) == ("cancelled", None, None)
    with session_scope(settings.database_url) as s:
        assert count_outputs(s, job_id) == 0


@pytest.mark.parametrize(
    "ending",
    ["transient_error", "hand_back", "disk_full"],
)
def test_a_cancel_racing_a_way_back_to_queued_ends_cancelled(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    from workers.context import give_back_running

    def race(ctx: RunContext) -> list[OutputRecord]:
        request_cancel_now(settings, ctx.job_id)
        if ending == "hand_back":
            give_back_running()
            ctx.check_stop()
        if ending == "disk_full":
            raise OSError(28, "No space left on device")
        raise TransientJobError("device busy")

    stub_runner(monkeypatch, lifecycle, race)
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.lease_owner, job.handbacks) == ("cancelled", None, 0)


def test_a_stale_attempt_writes_nothing(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    def taken_over(ctx: RunContext) -> list[OutputRecord]:
        # another worker claimed the job after this attempt's lease expired
        set_columns(settings, ctx.job_id, attempts=ctx.attempt + 1, lease_owner="other:1")
        return [OutputRecord(0, 0, "stale", "stop", 1, 1)]

    stub_runner(monkeypatch, lifecycle, taken_over)
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.attempts, job.lease_owner) == ("running", 2, "other:1")
    with session_scope(settings.database_url) as s:
        assert count_outputs(s, job_id) == 0


def test_a_runner_ignoring_its_stop_flag_is_stopped_by_force(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    grace = settings.model_copy(update={"stop_grace_s": 0.2})
    publisher = JobPublisher(grace)
    restarts: list[str] = []
    seen: dict[str, Any] = {}
    lifecycle = JobLifecycle(grace, publisher, "cpu", restart=restarts.append)

    def stubborn(ctx: RunContext) -> list[OutputRecord]:
        deadline = time.monotonic() + 10
        while not restarts and time.monotonic() < deadline:
            time.sleep(0.05)  # never looks at its stop flag
        seen["job"] = load_job(grace.database_url, ctx.job_id)
        return [OutputRecord(0, 0, "too late", "stop", 1, 1)]

    stub_runner(monkeypatch, lifecycle, stubborn)
    job_id = insert_job(grace.database_url, kind=JobKind.NOOP)
    set_columns(grace, job_id, max_runtime_s=0.1)
    try:
        lifecycle.execute(job_id)
    finally:
        publisher.close()
    assert len(restarts) == 1 and job_id in restarts[0]
    assert (seen["job"].status, seen["job"].error_type) == ("failed", "timed_out")
    job = load_job(grace.database_url, job_id)
    assert (job.status, job.error_type) == ("failed", "timed_out")  # the late result lost
    with session_scope(grace.database_url) as s:
        assert count_outputs(s, job_id) == 0


class _ModelRunner:
    """A runner that 'trains' a model directory in the attempt's work dir."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir

    def run(self, spec: dict[str, Any], ctx: RunContext) -> RunResult:
        path = self._data_dir / "work" / ctx.job_id / f"attempt-{ctx.attempt}" / "model"
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"weights")
        trained = TrainedModel(path, "tiny-gpt2", FineTuneTask.CAUSAL_LM, FineTuneMethod.FULL)
        return RunResult(trained_model=trained)


@pytest.mark.parametrize("landed", [True, False], ids=["commit-landed", "commit-rolled-back"])
def test_a_finish_whose_commit_raised_is_settled_by_reading_the_job(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """The connection drops during the finishing COMMIT. Landed: the retry finds the job
    already succeeded by this attempt, and its registered model stays on disk (it used to
    be deleted as 'unregistered'). Rolled back: the retry stores it as usual."""
    monkeypatch.setattr(
        lifecycle_module, "runner_for", lambda kind, s: _ModelRunner(settings.data_dir)
    )
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    real = lifecycle_module.session_scope
    dropped: list[bool] = []

    @contextmanager
    def commit_then_drop(url: str, **kw: Any) -> Iterator[Session]:
        with real(url, **kw) as session:
            yield session
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            finishing = not dropped and status == "succeeded"
            if finishing and not landed:
                dropped.append(True)
                raise OperationalError("COMMIT", {}, Exception("connection reset"))
        if finishing and landed:
            dropped.append(True)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(lifecycle_module, "session_scope", commit_then_drop)
    lifecycle.execute(job_id)
    assert dropped == [True]
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.attempts) == ("succeeded", 1)
    model = job.result["model"]  # type: ignore[index]
    with real(settings.database_url) as s:
        registered = get_model(s, model)
        assert registered is not None
        path = settings.data_dir / registered.path
    assert (path / "model.safetensors").read_bytes() == b"weights"


class _FullStore:
    """An artifact store on a full disk: every publish fails with ENOSPC."""

    def __init__(self) -> None:
        self.removed: list[Path] = []

    def publish(self, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def remove(self, path: Path) -> None:
        self.removed.append(path)


def test_a_full_disk_storing_the_model_retries_and_keeps_no_copy(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing the trained model fills the disk: the finish rolls back, the job is
    retried as disk_full (it used to fail for good as runtime_error), and the unregistered
    model goes, locally and from the store."""
    monkeypatch.setattr(
        lifecycle_module, "runner_for", lambda kind, s: _ModelRunner(settings.data_dir)
    )
    store = _FullStore()
    monkeypatch.setattr(lifecycle_module, "artifact_store", lambda s: store)
    job_id = insert_job(settings.database_url, kind=JobKind.NOOP)
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.error_type, job.attempts) == ("queued", "disk_full", 1)
    model = settings.data_dir / "work" / job_id / "attempt-1" / "model"
    assert not model.exists()
    assert store.removed == [model]
    with session_scope(settings.database_url) as s:
        name = model_name("tiny-gpt2", FineTuneTask.CAUSAL_LM, None, job_id)
        assert get_model(s, name) is None


class _CountingLeases:
    """The lifecycle's broker leases, counting the renewals and releases that reach Redis."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.renewals = 0
        self.releases = 0

    def renew(self, *args: Any) -> bool:
        self.renewals += 1
        return bool(self._inner.renew(*args))

    def release(self, *args: Any) -> Any:
        self.releases += 1
        return self._inner.release(*args)


@pytest.mark.parametrize("run_s", [0.0, 0.3], ids=["shorter_than_a_beat", "several_beats"])
def test_the_broker_lease_is_taken_one_beat_in_and_dropped_at_the_end(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, run_s: float
) -> None:
    import redis

    from workers.leases import lease_key

    beat = settings.model_copy(update={"heartbeat_interval_s": 0.1})
    publisher = JobPublisher(beat)
    lifecycle = JobLifecycle(beat, publisher, "cpu")
    counting = _CountingLeases(lifecycle.leases)
    lifecycle.leases = counting  # type: ignore[assignment]
    held: list[bool] = []
    broker = redis.Redis.from_url(beat.broker_url)

    def run(ctx: RunContext) -> list[OutputRecord]:
        time.sleep(run_s)
        held.append(bool(broker.exists(lease_key(ctx.job_id))))
        return []

    stub_runner(monkeypatch, lifecycle, run)
    job_id = insert_job(beat.database_url, kind=JobKind.NOOP)
    try:
        lifecycle.execute(job_id)
        assert load_job(beat.database_url, job_id).status == "succeeded"
        # A job that ends within one beat never touches Redis for its lease; a longer one
        # holds it while it runs and drops it when it ends.
        expected = (0, 0, False) if run_s == 0 else (counting.renewals, 1, True)
        assert (counting.renewals, counting.releases, held[0]) == expected
        assert counting.renewals >= (0 if run_s == 0 else 2)
        assert not broker.exists(lease_key(job_id))
    finally:
        publisher.close()
        broker.close()
