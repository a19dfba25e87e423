"""A tenant's cap on running jobs holds under concurrent claims; other tenants' jobs
are not held up by it; the reconciler republishes tenants' jobs interleaved."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from core.enums import JobKind, JobStatus
from db import tenants as tenants_repo
from db.attempts import finish_job
from db.base import utcnow
from db.events import list_events
from db.jobs import claim, claim_many, count_waiting, create_job, due_queued
from db.models import Job, WebhookDelivery
from db.session import migrate, session_scope
from tests.support.jobs import insert_job, load_job

TTL = timedelta(seconds=30)


@pytest.fixture(scope="module")
def url(database_url: str) -> str:
    migrate(database_url)
    return database_url


def tenant(url: str, max_running_jobs: int | None = None) -> str:
    with session_scope(url) as s:
        row = tenants_repo.create_tenant(
            s, f"t-{uuid.uuid4().hex[:8]}", max_running_jobs=max_running_jobs
        )
        return row.id


def test_capped_tenant_keeps_extra_jobs_queued_until_one_ends(url: str) -> None:
    capped, free = tenant(url, max_running_jobs=1), tenant(url)
    first, second = insert_job(url, tenant_id=capped), insert_job(url, tenant_id=capped)
    others = [insert_job(url, tenant_id=free) for _ in range(3)]
    with session_scope(url) as s:
        assert claim(s, first, "w1", TTL) is not None
    with session_scope(url) as s:
        assert claim(s, second, "w2", TTL) is None
    assert load_job(url, second).status == JobStatus.QUEUED.value
    for job_id in others:  # the capped tenant holds up nobody else
        with session_scope(url) as s:
            assert claim(s, job_id, "w3", TTL) is not None
    with session_scope(url) as s:
        assert finish_job(s, first, JobStatus.SUCCEEDED, attempt=1)
    with session_scope(url) as s:
        row = claim(s, second, "w2", TTL)
    assert row is not None and row.tenant_id == capped


def test_a_claim_records_one_claimed_event_whichever_path_it_took(url: str) -> None:
    """Without a default cap the claim tries the one-statement path for uncapped tenants
    first; a capped tenant's job falls through to the locked path, and each claim leaves
    one status event."""
    capped, free = tenant(url, max_running_jobs=2), tenant(url)
    jobs = [insert_job(url, tenant_id=capped), insert_job(url, tenant_id=free)]
    for job_id in jobs:
        with session_scope(url) as s:
            row = claim(s, job_id, "w1", TTL)
        assert row is not None and row.attempts == 1
        with session_scope(url) as s:
            claimed = [e for e in list_events(s, job_id) if e.message == "claimed by w1"]
        assert len(claimed) == 1 and claimed[0].data["status"] == JobStatus.RUNNING.value


def test_the_settings_default_cap_applies_to_tenants_without_their_own(url: str) -> None:
    t = tenant(url)
    jobs = [insert_job(url, tenant_id=t) for _ in range(3)]
    won = []
    for job_id in jobs:
        with session_scope(url) as s:
            won.append(claim(s, job_id, "w", TTL, default_running_cap=2) is not None)
    assert won == [True, True, False]


def test_concurrent_claims_never_overshoot_the_cap(url: str) -> None:
    t = tenant(url, max_running_jobs=2)
    jobs = [insert_job(url, tenant_id=t) for _ in range(8)]
    barrier = threading.Barrier(len(jobs))
    wins: list[str] = []
    errors: list[BaseException] = []

    def take(job_id: str) -> None:
        barrier.wait()
        try:
            with session_scope(url) as s:
                if claim(s, job_id, f"w-{job_id}", TTL) is not None:
                    wins.append(job_id)
        except BaseException as exc:  # SQLite: "database is locked" counts as a lost claim
            if "locked" not in str(exc):
                errors.append(exc)

    threads = [threading.Thread(target=take, args=(j,)) for j in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    with session_scope(url) as s:
        running = (
            s.query(Job).filter(Job.tenant_id == t, Job.status == JobStatus.RUNNING.value).count()
        )
    assert running == len(wins) <= 2
    assert len(wins) >= 1


def test_due_queued_puts_one_tenants_backlog_after_the_others_first_jobs(url: str) -> None:
    busy, quiet = tenant(url), tenant(url)
    for _ in range(5):
        insert_job(url, tenant_id=busy)
    lone = insert_job(url, tenant_id=quiet)
    with session_scope(url) as s:
        later = utcnow() + timedelta(seconds=1)
        due = [j for j in due_queued(s, later, timedelta(0)) if j.tenant_id in (busy, quiet)]
        ids = [j.id for j in due]
    assert ids.index(lone) <= 1


def test_due_queued_leaves_out_jobs_of_a_tenant_at_its_cap(url: str) -> None:
    t = tenant(url, max_running_jobs=2)
    jobs = [insert_job(url, tenant_id=t) for _ in range(5)]
    with session_scope(url) as s:
        assert claim(s, jobs[0], "w", TTL) is not None

    def due_of_t() -> list[str]:
        with session_scope(url) as s:
            later = utcnow() + timedelta(seconds=1)
            return [j.id for j in due_queued(s, later, timedelta(0)) if j.tenant_id == t]

    assert due_of_t() == [jobs[1]]  # room for one more
    with session_scope(url) as s:
        assert claim(s, jobs[1], "w", TTL) is not None
    assert due_of_t() == []


def test_jobs_of_a_capped_tenant_are_not_waiting_for_an_idle_worker(url: str) -> None:
    """The liveness check counts only work some worker may take: a tenant at its running
    cap with a backlog does not make an idle worker look stalled."""

    def waiting() -> int:
        with session_scope(url) as s:
            return count_waiting(s, [JobKind.GENERATE], utcnow() + timedelta(seconds=5))

    capped = tenant(url, max_running_jobs=1)
    first = insert_job(url, tenant_id=capped)
    with session_scope(url) as s:
        assert claim(s, first, "w1", TTL) is not None
    base = waiting()
    insert_job(url, tenant_id=capped)
    insert_job(url, tenant_id=capped)
    assert waiting() == base  # the capped tenant's backlog: nobody may take it
    insert_job(url, tenant_id=tenant(url))
    assert waiting() == base + 1  # an uncapped tenant's job counts
    with session_scope(url) as s:
        assert finish_job(s, first, JobStatus.SUCCEEDED, attempt=1)
    assert waiting() == base + 3  # below its cap again: its backlog counts


def test_claim_many_takes_free_jobs_together_and_capped_ones_up_to_their_cap(url: str) -> None:
    capped, free = tenant(url, max_running_jobs=1), tenant(url)
    jobs = [insert_job(url, tenant_id=free), insert_job(url, tenant_id=capped)]
    jobs += [insert_job(url, tenant_id=capped), insert_job(url, tenant_id=free)]
    taken_elsewhere, cancelled = insert_job(url, tenant_id=free), insert_job(url, tenant_id=free)
    with session_scope(url) as s:
        assert claim(s, taken_elsewhere, "other", TTL) is not None
    with session_scope(url) as s:
        s.get_one(Job, cancelled).cancel_requested = True
    with session_scope(url) as s:
        rows = claim_many(s, [*jobs, taken_elsewhere, cancelled], "w", TTL, note="joined")
    # in the order asked; the capped tenant's second job, the other worker's job and the
    # cancelled one stay where they were
    assert list(rows) == [jobs[0], jobs[1], jobs[3]]
    assert {r.tenant_id for r in rows.values()} == {free, capped}
    assert all(r.attempts == 1 and r.spec["model"] == "m" for r in rows.values())
    assert load_job(url, jobs[2]).status == JobStatus.QUEUED.value
    assert load_job(url, cancelled).status == JobStatus.QUEUED.value
    other = load_job(url, taken_elsewhere)
    assert other.lease_owner == "other" and other.attempts == 1
    for job_id in rows:
        job = load_job(url, job_id)
        assert (job.status, job.lease_owner, job.attempts) == (JobStatus.RUNNING.value, "w", 1)
        with session_scope(url) as s:
            messages = [e.message for e in list_events(s, job_id)]
        assert messages[-2:] == ["claimed by w", "joined"]


def test_claim_many_keeps_the_settings_default_cap(url: str) -> None:
    t = tenant(url)
    jobs = [insert_job(url, tenant_id=t) for _ in range(3)]
    with session_scope(url) as s:
        rows = claim_many(s, jobs, "w", TTL, default_running_cap=2)
    assert list(rows) == jobs[:2]
    assert load_job(url, jobs[2]).status == JobStatus.QUEUED.value


def test_concurrent_claim_many_never_claims_a_job_twice(url: str) -> None:
    t = tenant(url)
    jobs = [insert_job(url, tenant_id=t) for _ in range(12)]
    barrier = threading.Barrier(3)
    won: list[list[str]] = []
    errors: list[BaseException] = []

    def take(worker: str) -> None:
        barrier.wait()
        try:
            with session_scope(url) as s:
                won.append(list(claim_many(s, jobs, worker, TTL)))
        except BaseException as exc:  # SQLite: "database is locked" counts as a lost claim
            errors.append(exc)

    threads = [threading.Thread(target=take, args=(f"w{i}",)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    claimed = [job_id for batch in won for job_id in batch]
    assert sorted(claimed) == sorted(jobs)  # each exactly once
    assert all(load_job(url, j).attempts == 1 for j in jobs)
    assert not [e for e in errors if "locked" not in str(e)]


def test_claim_many_queues_the_started_webhook_of_the_jobs_subscribed_to_it(url: str) -> None:
    def job(events: str | None) -> str:
        with session_scope(url) as s:
            return create_job(
                s,
                kind=JobKind.GENERATE,
                spec={"model": "m", "prompts": ["p"]},
                priority=0,
                max_attempts=3,
                metadata={},
                webhook_url=None if events is None else "http://127.0.0.1:9/hook",
                webhook_events=events,
            ).id

    started, completed_only, none = job(",started,"), job(",completed,"), job(None)
    with session_scope(url) as s:
        assert len(claim_many(s, [started, completed_only, none], "w", TTL)) == 3
    with session_scope(url) as s:
        queued = s.execute(select(WebhookDelivery.job_id, WebhookDelivery.event)).all()
    mine = [tuple(r) for r in queued if r[0] in {started, completed_only, none}]
    assert mine == [(started, "started")]
    payload = load_delivery_payload(url, started)
    assert payload["type"] == "job.started" and payload["data"]["worker"] == "w"


def load_delivery_payload(url: str, job_id: str) -> dict[str, object]:
    with session_scope(url) as s:
        return dict(
            s.scalars(select(WebhookDelivery.payload).where(WebhookDelivery.job_id == job_id)).one()
        )
