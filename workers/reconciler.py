"""Repairs what the broker forgot: lost messages and expired leases; expires batches
whose completion window passed while they were queued.

Every change is a compare-and-set, so several reconcilers at once are safe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from core.dispatch import JobPublisher
from core.enums import EventType, FailureType, JobKind, JobStatus
from core.settings import Settings
from db.base import utcnow
from db.events import append_event
from db.jobs import due_queued, expired_leases, requeue_job, transition
from db.models import Job
from db.session import session_scope
from workers.batch.expiry import expire_overdue_batches

logger = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    requeued: int = 0
    failed: int = 0
    cancelled: int = 0
    republished: int = 0
    expired: int = 0


def _expire_leases(settings: Settings, report: ReconcileReport) -> list[tuple[str, JobKind, int]]:
    now = utcnow()
    to_publish: list[tuple[str, JobKind, int]] = []
    with session_scope(settings.database_url) as session:
        for job in expired_leases(session, now):
            same_lease = [Job.lease_owner == job.lease_owner, Job.lease_expires_at < now]
            reason = f"lease of {job.lease_owner} expired (worker lost)"
            if job.cancel_requested:
                if transition(
                    session,
                    job.id,
                    JobStatus.RUNNING,
                    JobStatus.CANCELLED,
                    where=same_lease,
                    values={"lease_owner": None, "lease_expires_at": None, "finished_at": now},
                    message=f"{reason}; cancel was requested",
                ):
                    report.cancelled += 1
            elif job.attempts >= job.max_attempts:
                if transition(
                    session,
                    job.id,
                    JobStatus.RUNNING,
                    JobStatus.FAILED,
                    where=same_lease,
                    values={
                        "lease_owner": None,
                        "lease_expires_at": None,
                        "finished_at": now,
                        "error_type": FailureType.WORKER_LOST.value,
                        "error_message": f"{reason} after {job.attempts} attempts",
                    },
                    message=f"{reason}; out of attempts",
                    data={"error_type": FailureType.WORKER_LOST.value},
                ):
                    report.failed += 1
            elif requeue_job(
                session,
                job.id,
                available_at=now,
                reason=reason,
                error_type=FailureType.WORKER_LOST.value,
                where=same_lease,
            ):
                report.requeued += 1
                to_publish.append((job.id, JobKind(job.kind), job.priority))
    return to_publish


def reconcile(settings: Settings, publisher: JobPublisher) -> ReconcileReport:
    report = ReconcileReport()
    for job_id, kind, priority in _expire_leases(settings, report):
        publisher.publish(job_id, kind, priority)
    report.expired = expire_overdue_batches(settings)
    with session_scope(settings.database_url) as session:
        due = [
            (j.id, JobKind(j.kind), j.priority)
            for j in due_queued(session, utcnow(), timedelta(seconds=settings.republish_grace_s))
        ]
    missing = set(publisher.missing_markers([job_id for job_id, _, _ in due]))
    republished: list[str] = []
    for job_id, kind, priority in due:
        if job_id in missing:
            publisher.publish(job_id, kind, priority)
            republished.append(job_id)
    if republished:
        with session_scope(settings.database_url) as session:
            for job_id in republished:
                append_event(
                    session, job_id, EventType.LOG, "message lost by the broker; republished"
                )
    report.republished = len(republished)
    if report.requeued or report.failed or report.cancelled or report.republished or report.expired:
        logger.info(
            "reconciled: requeued=%d failed=%d cancelled=%d republished=%d expired=%d",
            report.requeued,
            report.failed,
            report.cancelled,
            report.republished,
            report.expired,
        )
    return report
