"""Repairs what the broker forgot: lost messages (a due queued job the broker itself holds
no message for: core/broker_scan.py), messages a dead consumer took and never claimed, and
expired leases; expires queued jobs past their expires_at and batches whose completion
window passed while they were queued.

Every change is a compare-and-set, so several reconcilers at once are safe. Whichever
worker or beat process holds the recovery lease (workers/leader.py) runs it every
reconcile period, and each worker once at start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis

from core.broker_scan import BrokerMessages, Presence
from core.dispatch import JobPublisher
from core.enums import EventType, JobKind, JobStatus
from core.settings import Settings
from db.attempts import recover_lost
from db.clock import database_now
from db.events import append_event
from db.jobs import due_queued, due_retries, expire_overdue, expired_leases, overdue_queued
from db.models import Job
from db.session import session_scope
from workers.batch.expiry import expire_overdue_batches
from workers.leases import BrokerLeases, broker_leases, lease_value

logger = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    requeued: int = 0
    failed: int = 0
    cancelled: int = 0
    republished: int = 0
    expired: int = 0
    alive: int = 0  # database lease expired, but the worker still renews its broker lease
    paused: int = 0  # worker lost while a pause was asked: it rests paused, not requeued
    abandoned: int = 0  # of those republished: delivered to a consumer that died unclaimed


def _alive_in_broker(leases: BrokerLeases, jobs: list[Job]) -> set[str]:
    """Jobs whose attempt still renews its broker lease: the database was unreachable to
    it, it did not die. When Redis cannot say, the database lease decides alone."""
    try:
        holders = leases.holders([job.id for job in jobs])
    except redis.RedisError as exc:
        logger.warning("reconcile: broker leases unreadable (%s)", type(exc).__name__)
        return set()
    return {
        job.id
        for job in jobs
        if job.lease_owner and holders.get(job.id) == lease_value(job.lease_owner, job.attempts)
    }


_COUNTERS = {
    JobStatus.QUEUED: "requeued",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.PAUSED: "paused",
}


def _expire_leases(
    settings: Settings, report: ReconcileReport, leases: BrokerLeases
) -> list[tuple[str, JobKind, int]]:
    to_publish: list[tuple[str, JobKind, int]] = []
    with session_scope(settings.database_url) as session:
        now = database_now(session)  # leases are judged by the database's clock alone
        expired = list(expired_leases(session, now))
        alive = _alive_in_broker(leases, expired) if expired else set()
        for job in expired:
            if job.id in alive:
                report.alive += 1
                continue
            status = recover_lost(session, job, now)
            if status is None:
                logger.info(
                    "reconcile: job %s attempt %d changed meanwhile (compare-and-set lost)",
                    job.id,
                    job.attempts,
                )
                continue
            counter = _COUNTERS[status]
            setattr(report, counter, getattr(report, counter) + 1)
            if status is JobStatus.QUEUED:
                to_publish.append((job.id, JobKind(job.kind), job.priority))
    return to_publish


def _expire_overdue_queued(settings: Settings) -> int:
    expired = 0
    with session_scope(settings.database_url) as session:
        now = database_now(session)
        for job_id in overdue_queued(session, now):
            if expire_overdue(session, job_id, now):
                expired += 1
    return expired


LOST = "message lost by the broker; republished"
ABANDONED = "message taken by a consumer that never claimed the job; republished"


def _why_republish(
    settings: Settings, publisher: JobPublisher, found: BrokerMessages, job_id: str, now_s: float
) -> str | None:
    """Why a due queued job needs a new message, or None when the broker holds one for it.

    A message on a queue is on its way. A delivery not acknowledged is a consumer taking the
    job right now, unless it is older than the grace: its consumer died between receiving
    it and claiming the job (a claim makes the job running), and kombu would wait out the
    visibility timeout before delivering it again. That delivery is removed and the job
    republished; should its consumer be alive after all, the claim compare-and-set lets one
    of the two messages run the job and the other is dropped."""
    where = found.presence(job_id)
    if where is Presence.QUEUED:
        return None
    if where is Presence.ABSENT:
        return LOST
    deliveries = found.deliveries(job_id)
    if not all(d.older_than(settings.republish_grace_s, now_s) for d in deliveries):
        return None
    forgotten = [d for d in deliveries if publisher.forget_delivery(d)]
    # none removed: acked or restored to its queue meanwhile; the next pass looks again
    return ABANDONED if forgotten else None


def reconcile(
    settings: Settings, publisher: JobPublisher, leases: BrokerLeases | None = None
) -> ReconcileReport:
    report = ReconcileReport()
    leases = leases or broker_leases(settings.broker_url)
    for job_id, kind, priority in _expire_leases(settings, report, leases):
        publisher.publish(job_id, kind, priority)
    report.expired = expire_overdue_batches(settings) + _expire_overdue_queued(settings)
    with session_scope(settings.database_url) as session:
        due = [
            (j.id, JobKind(j.kind), j.priority)
            for j in due_queued(
                session,
                database_now(session),
                timedelta(seconds=settings.republish_grace_s),
                default_running_cap=settings.max_running_jobs,
            )
        ]
    republished: dict[str, str] = {}
    found = publisher.messages() if due else None
    now_s = time.time()
    for job_id, kind, priority in due:
        assert found is not None
        why = _why_republish(settings, publisher, found, job_id, now_s)
        if why is not None:
            publisher.publish(job_id, kind, priority)
            republished[job_id] = why
            if why is ABANDONED:
                report.abandoned += 1
    if republished:
        with session_scope(settings.database_url) as session:
            for job_id, why in republished.items():
                append_event(session, job_id, EventType.LOG, why)
    report.republished = len(republished)
    if any((report.requeued, report.failed, report.cancelled, report.republished)) or any(
        (report.expired, report.alive)
    ):
        logger.info(
            "reconciled: requeued=%d failed=%d cancelled=%d republished=%d (abandoned=%d) "
            "expired=%d left-alive=%d",
            report.requeued,
            report.failed,
            report.cancelled,
            report.republished,
            report.abandoned,
            report.expired,
            report.alive,
        )
    return report


class RetryPublisher:
    """Publishes each deferred job (a retry after its backoff) when it falls due, by the
    database's clock, so a retry does not wait for the next reconcile pass. It remembers
    how far it got; on its first pass it looks one reconcile period back (anything older
    is the reconciler's, whose republishing covers every due queued job)."""

    def __init__(self, settings: Settings, publisher: JobPublisher) -> None:
        self._settings = settings
        self._publisher = publisher
        self._since: datetime | None = None

    def publish_due(self) -> int:
        with session_scope(self._settings.database_url, readonly=True) as session:
            if self._since is None:
                self._since = database_now(session) - timedelta(
                    seconds=self._settings.reconcile_period_s
                )
            due = due_retries(session, self._since)
        for job_id, kind, priority in due.jobs:
            self._publisher.publish(job_id, kind, priority)
        self._since = due.until
        if due.jobs:
            logger.info("published %d retries that fell due", len(due.jobs))
        return len(due.jobs)
