"""How a running attempt ends: one repository function per transition, each a
compare-and-set on the attempt number (the fencing token, see db/fencing.py).

Every way out of `running` that is not a final success honours a cancel: a job whose
`cancel_requested` is set ends `cancelled` instead of going back to `queued` or `paused`,
so no cancel is forgotten. Each function returns the status it recorded, or None when the
attempt no longer held the job (its compare-and-set lost: nothing was written).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import ColumnElement, bindparam
from sqlalchemy.orm import Session

from core.enums import FailureType, JobKind, JobStatus
from db.base import utcnow
from db.clock import db_now, db_time_after
from db.fencing import current_attempt
from db.jobs import PreparedTransition, transition
from db.models import JOBS, Job

_RELEASE: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}


def _attempt(job_id: str, attempt: int, *extra: ColumnElement[bool]) -> list[ColumnElement[bool]]:
    return [*current_attempt(job_id, attempt), *extra]


@cache  # one per (target, with_result): a handful of statements
def _finish_transition(target: JobStatus, with_result: bool) -> PreparedTransition:
    """running -> `target` for the attempt `attempt` (unless a cancel was asked, for every
    target but cancelled), recording `error_type_value` and `error_message_value` and, with
    `with_result`, `result_value` as the job's result."""
    where = [JOBS.c.attempts == bindparam("attempt")]
    if target is not JobStatus.CANCELLED:
        where.append(JOBS.c.cancel_requested.is_(False))
    values: dict[str, Any] = {
        **_RELEASE,
        "pause_requested": False,
        "finished_at": bindparam("now", type_=JOBS.c.finished_at.type),
        "error_type": bindparam("error_type_value", type_=JOBS.c.error_type.type),
        "error_message": bindparam("error_message_value", type_=JOBS.c.error_message.type),
    }
    if with_result:
        values["result"] = bindparam("result_value", type_=JOBS.c.result.type)
    if target is JobStatus.SUCCEEDED:
        values["progress"] = 1.0
    return PreparedTransition(JobStatus.RUNNING, target, where, values)


def finish_job(
    session: Session,
    job_id: str,
    target: JobStatus,
    *,
    attempt: int,
    by: str | None = None,
    error_type: str | None = None,
    error_message: str | None = None,
    result: dict[str, Any] | None = None,
) -> bool:
    """running -> succeeded|failed|cancelled|expired for `attempt`; a success, a failure (and a
    timeout) lose to a cancel asked before they commit (see `end_attempt`)."""
    finish = _finish_transition(target, result is not None)
    params: dict[str, Any] = {
        "attempt": attempt,
        "error_type_value": error_type,
        "error_message_value": error_message,
    }
    if result is not None:
        params["result_value"] = result
    data: dict[str, Any] = {"attempt": attempt, **({"by": by} if by else {})}
    if error_type:
        data["error_type"] = error_type
    return finish(session, job_id, params, error_message or "", data) is not None


def cancel_attempt(
    session: Session, job_id: str, *, attempt: int, message: str, by: str | None = None
) -> bool:
    """running -> cancelled for `attempt`, when a cancel was asked."""
    return transition(
        session,
        job_id,
        JobStatus.RUNNING,
        JobStatus.CANCELLED,
        where=_attempt(job_id, attempt, Job.cancel_requested.is_(True)),
        values={**_RELEASE, "pause_requested": False, "finished_at": utcnow()},
        message=message,
        data={"attempt": attempt, **({"by": by} if by else {})},
    )


def end_attempt(
    session: Session,
    job_id: str,
    target: JobStatus,
    *,
    attempt: int,
    by: str | None = None,
    error_type: str | None = None,
    error_message: str | None = None,
    result: dict[str, Any] | None = None,
) -> JobStatus | None:
    """Record `target` for `attempt`, or `cancelled` when a cancel was asked first."""
    if finish_job(
        session,
        job_id,
        target,
        attempt=attempt,
        by=by,
        error_type=error_type,
        error_message=error_message,
        result=result,
    ):
        return target
    if _cancelled_instead(session, job_id, attempt, by, target.value):
        return JobStatus.CANCELLED
    return None


def _cancelled_instead(
    session: Session, job_id: str, attempt: int, by: str | None, ending: str
) -> bool:
    """`attempt`'s own ending lost to a pending cancel: record `cancelled` instead."""
    return cancel_attempt(
        session, job_id, attempt=attempt, by=by, message=f"cancelled (instead of {ending})"
    )


def counted_attempts(job: Job) -> int:
    """Attempts that count toward max_attempts (hand-backs and pauses do not)."""
    return job.attempts - job.handbacks


def _requeue_values(
    now: datetime | ColumnElement[datetime], available_at: datetime | ColumnElement[datetime]
) -> dict[str, Any]:
    return {**_RELEASE, "queued_at": now, "available_at": available_at}


def retry_attempt(
    session: Session,
    job_id: str,
    *,
    attempt: int,
    delay_s: float,
    failure: FailureType,
    message: str,
    by: str | None = None,
) -> JobStatus | None:
    """After a transient error: running -> queued (due `delay_s` from now by the database's
    clock, so a worker's own clock cannot shift it), or failed when the counted attempts
    reached max_attempts, or cancelled when a cancel was asked."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.attempts != attempt:
        return None
    if counted_attempts(job) >= job.max_attempts:
        return end_attempt(
            session,
            job_id,
            JobStatus.FAILED,
            attempt=attempt,
            by=by,
            error_type=failure.value,
            error_message=f"{message} (after {counted_attempts(job)} attempts)",
        )
    if transition(
        session,
        job_id,
        JobStatus.RUNNING,
        JobStatus.QUEUED,
        where=_attempt(job_id, attempt, Job.cancel_requested.is_(False)),
        values={
            **_requeue_values(db_now(), db_time_after(delay_s)),
            "error_type": failure.value,
            "error_message": message,
        },
        message=message,
        data={"attempt": attempt, "error_type": failure.value, **({"by": by} if by else {})},
    ):
        return JobStatus.QUEUED
    if _cancelled_instead(session, job_id, attempt, by, f"a retry: {message}"):
        return JobStatus.CANCELLED
    return None


@dataclass(frozen=True, slots=True)
class HandedBack:
    status: JobStatus  # queued (publish it) or cancelled
    kind: JobKind
    priority: int


def hand_back(session: Session, job_id: str, *, attempt: int, by: str) -> HandedBack | None:
    """running -> queued by its own worker (shutting down), due now; counted as a hand-back,
    not an attempt. Cancelled instead when a cancel was asked."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    kind, priority = JobKind(job.kind), job.priority
    now = utcnow()
    if transition(
        session,
        job_id,
        JobStatus.RUNNING,
        JobStatus.QUEUED,
        where=_attempt(job_id, attempt, Job.cancel_requested.is_(False)),
        values={
            **_requeue_values(now, now),
            "handbacks": Job.handbacks + 1,
            "error_type": None,
            "error_message": None,
        },
        message=f"given back by {by} (worker shutting down); this attempt does not count "
        "toward max_attempts",
        data={"attempt": attempt, "by": by, "reason": "worker_shutdown"},
    ):
        return HandedBack(JobStatus.QUEUED, kind, priority)
    if _cancelled_instead(session, job_id, attempt, by, "a hand-back"):
        return HandedBack(JobStatus.CANCELLED, kind, priority)
    return None


def pause_attempt(session: Session, job_id: str, *, attempt: int, by: str) -> JobStatus | None:
    """running -> paused by the attempt that checkpointed; counted as a hand-back. Cancelled
    instead when a cancel was asked."""
    if transition(
        session,
        job_id,
        JobStatus.RUNNING,
        JobStatus.PAUSED,
        where=_attempt(job_id, attempt, Job.cancel_requested.is_(False)),
        values={**_RELEASE, "pause_requested": False, "handbacks": Job.handbacks + 1},
        message=f"paused by {by} at its latest checkpoint",
        data={"attempt": attempt, "by": by},
    ):
        return JobStatus.PAUSED
    if _cancelled_instead(session, job_id, attempt, by, "a pause"):
        return JobStatus.CANCELLED
    return None


def recover_lost(session: Session, job: Job, now: datetime) -> JobStatus | None:
    """A running job whose lease expired (its worker lost): cancelled when a cancel was
    asked, paused when a pause was, failed `worker_lost` when out of attempts, else queued
    again, due now. A compare-and-set on the attempt and on the lease still being expired,
    so an attempt that renewed meanwhile keeps its job."""
    lost = [Job.lease_expires_at < now]
    reason = f"lease of {job.lease_owner} expired (worker lost)"
    data: dict[str, Any] = {"attempt": job.attempts}
    if transition(
        session,
        job.id,
        JobStatus.RUNNING,
        JobStatus.CANCELLED,
        where=_attempt(job.id, job.attempts, Job.cancel_requested.is_(True), *lost),
        values={**_RELEASE, "pause_requested": False, "finished_at": now},
        message=f"{reason}; cancel was requested",
        data=data,
    ):
        return JobStatus.CANCELLED
    if transition(
        session,
        job.id,
        JobStatus.RUNNING,
        JobStatus.PAUSED,
        where=_attempt(
            job.id,
            job.attempts,
            Job.cancel_requested.is_(False),
            Job.pause_requested.is_(True),
            *lost,
        ),
        values={**_RELEASE, "pause_requested": False},
        message=f"{reason}; pause was requested",
        data=data,
    ):
        return JobStatus.PAUSED
    if counted_attempts(job) >= job.max_attempts:
        message = f"{reason} after {counted_attempts(job)} attempts"
        if transition(
            session,
            job.id,
            JobStatus.RUNNING,
            JobStatus.FAILED,
            where=_attempt(job.id, job.attempts, Job.cancel_requested.is_(False), *lost),
            values={
                **_RELEASE,
                "finished_at": now,
                "error_type": FailureType.WORKER_LOST.value,
                "error_message": message,
            },
            message=f"{reason}; out of attempts",
            data={**data, "error_type": FailureType.WORKER_LOST.value},
        ):
            return JobStatus.FAILED
        return None
    if transition(
        session,
        job.id,
        JobStatus.RUNNING,
        JobStatus.QUEUED,
        where=_attempt(job.id, job.attempts, Job.cancel_requested.is_(False), *lost),
        values={
            **_requeue_values(now, now),
            "error_type": FailureType.WORKER_LOST.value,
            "error_message": reason,
        },
        message=reason,
        data={**data, "error_type": FailureType.WORKER_LOST.value},
    ):
        return JobStatus.QUEUED
    return None
