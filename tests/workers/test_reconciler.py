"""The reconciler against a real database and Redis, without a worker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from core.broker_scan import Presence
from core.dispatch import JobPublisher, make_celery
from core.enums import JobKind, JobStatus
from core.settings import Settings
from db.base import utcnow
from db.events import list_events
from db.jobs import claim_job, request_cancel
from db.models import Job
from db.pauses import request_pause
from db.session import migrate, session_scope
from tests.support.broker import receive_and_vanish
from tests.support.harness import wait_for
from tests.support.jobs import insert_job, load_job
from tests.support.services import redis_db_index
from workers.reconciler import reconcile


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    migrate(database_url)
    with redis_db_index() as broker:
        yield Settings(
            data_dir=Path(tmp_path_factory.mktemp("data")),
            database_url=database_url,
            broker_url=broker,
            republish_grace_s=0,
        )


@pytest.fixture
def publisher(settings: Settings) -> Iterator[JobPublisher]:
    pub = JobPublisher(settings)
    redis.Redis.from_url(settings.broker_url).flushdb()
    yield pub
    pub.close()


def expire_lease(settings: Settings, job_id: str) -> None:
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, "dead-worker", timedelta(seconds=30))
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def presence(publisher: JobPublisher, job_id: str) -> Presence:
    return publisher.messages().presence(job_id)


def test_republishes_only_jobs_the_broker_has_no_message_for(
    settings: Settings, publisher: JobPublisher
) -> None:
    published, lost = insert_job(settings.database_url), insert_job(settings.database_url)
    publisher.publish(published, JobKind.GENERATE, 0)
    report = reconcile(settings, publisher)
    assert (report.republished, report.abandoned) == (1, 0)
    assert presence(publisher, lost) is Presence.QUEUED
    # a second pass finds every message in place: nothing piles up
    assert reconcile(settings, publisher).republished == 0
    assert redis.Redis.from_url(settings.broker_url).llen("generate:9") == 2
    with session_scope(settings.database_url) as s:
        assert any("lost by the broker" in e.message for e in list_events(s, lost))
        assert not any("republished" in e.message for e in list_events(s, published))


def test_a_delivery_a_dead_consumer_never_claimed_is_taken_back_and_republished(
    settings: Settings, publisher: JobPublisher
) -> None:
    job_id = insert_job(settings.database_url)
    publisher.publish(job_id, JobKind.GENERATE, 0)
    tag = receive_and_vanish(make_celery(settings), "generate")
    broker = redis.Redis.from_url(settings.broker_url)
    with session_scope(settings.database_url) as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(queued_at=utcnow() - timedelta(hours=1))
        )
    # a delivery within the grace may be its consumer claiming it right now: left alone
    patient = settings.model_copy(update={"republish_grace_s": 600})
    assert reconcile(patient, publisher).abandoned == 0
    assert presence(publisher, job_id) is Presence.UNACKED
    assert reconcile(settings, publisher).abandoned == 1
    assert not broker.hexists("unacked", tag)
    assert broker.zscore("unacked_index", tag) is None
    assert presence(publisher, job_id) is Presence.QUEUED
    assert reconcile(settings, publisher).abandoned == 0
    assert len(broker.lrange("generate:9", 0, -1)) == len(set(broker.lrange("generate:9", 0, -1)))
    with session_scope(settings.database_url) as s:
        assert any("never claimed" in e.message for e in list_events(s, job_id))


def test_a_running_jobs_delivery_is_left_alone(settings: Settings, publisher: JobPublisher) -> None:
    job_id = insert_job(settings.database_url)
    publisher.publish(job_id, JobKind.GENERATE, 0)
    tag = receive_and_vanish(make_celery(settings), "generate")
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, "live-worker", timedelta(seconds=60))
    assert reconcile(settings, publisher).abandoned == 0
    assert redis.Redis.from_url(settings.broker_url).hexists("unacked", tag)
    assert presence(publisher, job_id) is Presence.UNACKED


def test_expired_lease_goes_back_to_queued_and_is_published(
    settings: Settings, publisher: JobPublisher
) -> None:
    job_id = insert_job(settings.database_url)
    expire_lease(settings, job_id)
    report = reconcile(settings, publisher)
    assert report.requeued == 1
    job = load_job(settings.database_url, job_id)
    assert job.status == "queued"
    assert job.attempts == 1
    assert job.lease_owner is None
    assert job.error_type == "worker_lost"
    assert presence(publisher, job_id) is Presence.QUEUED


def test_expired_lease_after_max_attempts_fails(
    settings: Settings, publisher: JobPublisher
) -> None:
    job_id = insert_job(settings.database_url, max_attempts=1)
    expire_lease(settings, job_id)
    assert reconcile(settings, publisher).failed == 1
    job = load_job(settings.database_url, job_id)
    assert job.status == "failed"
    assert job.error_type == "worker_lost"


def test_expired_lease_with_cancel_requested_is_cancelled(
    settings: Settings, publisher: JobPublisher
) -> None:
    job_id = insert_job(settings.database_url)
    expire_lease(settings, job_id)
    with session_scope(settings.database_url) as s:
        request_cancel(s, job_id, tenant_id=None)
    assert reconcile(settings, publisher).cancelled == 1
    assert load_job(settings.database_url, job_id).status == "cancelled"
    with session_scope(settings.database_url) as s:
        assert any("cancel" in e.message for e in list_events(s, job_id))


def test_expired_lease_with_pause_requested_rests_paused_and_is_not_republished(
    settings: Settings, publisher: JobPublisher
) -> None:
    job_id = insert_job(settings.database_url, kind=JobKind.FINETUNE)
    expire_lease(settings, job_id)
    with session_scope(settings.database_url) as s:
        request_pause(s, job_id, tenant_id=None)
    assert reconcile(settings, publisher).paused == 1
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.lease_owner, job.pause_requested) == ("paused", None, False)
    reconcile(settings, publisher)
    assert load_job(settings.database_url, job_id).status == "paused"
    assert presence(publisher, job_id) is Presence.ABSENT


def test_live_lease_is_left_alone(settings: Settings, publisher: JobPublisher) -> None:
    job_id = insert_job(settings.database_url)
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, "live-worker", timedelta(seconds=60))
    report = reconcile(settings, publisher)
    assert (report.requeued, report.failed, report.cancelled) == (0, 0, 0)
    assert load_job(settings.database_url, job_id).lease_owner == "live-worker"


def test_expired_lease_of_a_worker_alive_in_the_broker_is_left_alone(
    settings: Settings, publisher: JobPublisher
) -> None:
    """The database was unreachable to the worker, which kept its broker lease: not dead."""
    from workers.leases import BrokerLeases

    job_id = insert_job(settings.database_url)
    expire_lease(settings, job_id)
    leases = BrokerLeases(settings.broker_url)
    try:
        assert leases.renew(job_id, "dead-worker", 1, 30)
        assert not leases.renew(job_id, "stale-worker", 0, 30)  # an older attempt: refused
        report = reconcile(settings, publisher, leases)
        assert (report.alive, report.requeued) == (1, 0)
        assert load_job(settings.database_url, job_id).status == "running"
        leases.release(job_id, "stale-worker", 0)  # not its lease: nothing happens
        report = reconcile(settings, publisher, leases)
        assert (report.alive, report.requeued) == (1, 0)
        leases.release(job_id, "dead-worker", 1)
        report = reconcile(settings, publisher, leases)
        assert report.requeued == 1
        assert load_job(settings.database_url, job_id).status == "queued"
    finally:
        leases.close()


def test_queued_job_past_expires_at_is_expired(settings: Settings, publisher: JobPublisher) -> None:
    job_id = insert_job(settings.database_url)
    with session_scope(settings.database_url) as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    report = reconcile(settings, publisher)
    assert report.expired == 1
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.error_type, job.attempts) == ("expired", "expired", 0)
    with session_scope(settings.database_url) as s:
        assert not [e for e in list_events(s, job_id) if "republished" in e.message]


def test_a_retry_is_published_when_its_backoff_ends(
    settings: Settings, publisher: JobPublisher
) -> None:
    """RetryPublisher: a retried job gets its message once it falls due (by the database's
    clock), not before, and only once."""
    from core.enums import FailureType
    from db.attempts import retry_attempt
    from workers.reconciler import RetryPublisher

    job_id = insert_job(settings.database_url)
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, "w", timedelta(seconds=30))
    published: list[str] = []

    class Recording(JobPublisher):
        def publish(self, job_id: str, kind: JobKind, priority: int) -> None:
            published.append(job_id)
            super().publish(job_id, kind, priority)

    recording = Recording(settings)
    retries = RetryPublisher(settings, recording)
    retries.publish_due()  # primes its starting point (and publishes other tests' retries)
    with session_scope(settings.database_url) as s:
        status = retry_attempt(
            s,
            job_id,
            attempt=1,
            delay_s=0.5,
            failure=FailureType.WORKER_LOST,
            message="transient",
        )
    assert status is JobStatus.QUEUED
    retries.publish_due()
    assert presence(publisher, job_id) is Presence.ABSENT  # not before its backoff ends
    wait_for(
        lambda: retries.publish_due() >= 0 and presence(publisher, job_id) is Presence.QUEUED,
        10,
        "the retry published when due",
    )
    retries.publish_due()
    recording.close()
    assert published.count(job_id) == 1  # published once, not on every pass
