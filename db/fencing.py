"""The fence every write of a running attempt goes through.

A claim makes the job's attempt number the fencing token. A write of attempt `n` first
runs `fence(session, job_id, n)`: a conditional UPDATE that matches only while the job is
`running` at attempt `n`. It also takes the job row's write lock until the caller's
transaction ends, so a claim, requeue or reconciler change of the same row waits for the
write to commit (or finds it gone): a stale attempt's write never commits alongside a
newer attempt's claim.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, bindparam, update
from sqlalchemy.orm import Session

from core.enums import JobStatus
from core.errors import StaleAttempt
from db.base import utcnow
from db.models import JOBS, Job


def current_attempt(job_id: str, attempt: int) -> list[ColumnElement[bool]]:
    """The conditions under which `attempt` is the job's live attempt."""
    return [Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.attempts == attempt]


_FENCE = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("job_id"),
        JOBS.c.status == JobStatus.RUNNING.value,
        JOBS.c.attempts == bindparam("attempt"),
    )
    .values(updated_at=bindparam("now", type_=JOBS.c.updated_at.type))
    .returning(JOBS.c.cancel_requested)
)


def fence_reading_cancel(session: Session, job_id: str, attempt: int) -> bool | None:
    """`fence`, returning the job's cancel flag as it stands under the row lock; None when
    `attempt` no longer holds the running job. (One UPDATE built once: every write of a
    running attempt runs it.)"""
    params = {"job_id": job_id, "attempt": attempt, "now": utcnow()}
    row = session.execute(_FENCE, params).first()
    return None if row is None else bool(row[0])


def fence(session: Session, job_id: str, attempt: int) -> bool:
    """True when `attempt` still holds the running job; the row stays locked until commit."""
    return fence_reading_cancel(session, job_id, attempt) is not None


def require_fence(session: Session, job_id: str, attempt: int) -> None:
    """Raise StaleAttempt unless `attempt` still holds the running job (see `fence`)."""
    if not fence(session, job_id, attempt):
        raise StaleAttempt(f"job {job_id}: attempt {attempt} no longer holds it")
