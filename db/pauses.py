"""Pausing and resuming fine-tune jobs: the state changes, as compare-and-set updates.

A queued fine-tune pauses at once; a running one is flagged, and its worker checkpoints,
stops and records `paused` (holding no lease: db/attempts.py `pause_attempt`). Resuming
queues it again: the next attempt continues from its latest checkpoint, under the same job
id and events.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from core.enums import EventType, JobKind, JobStatus
from core.errors import InvalidStateError
from db.base import utcnow
from db.events import append_event
from db.jobs import require_job, transition
from db.models import Job

PAUSABLE_KINDS = frozenset({JobKind.FINETUNE.value})


def _pausable(job: Job) -> None:
    if job.kind not in PAUSABLE_KINDS:
        raise InvalidStateError(
            f"job {job.id} is a {job.kind} job; only fine-tune jobs can be paused", param="job_id"
        )


def request_pause(session: Session, job_id: str, *, tenant_id: str | None) -> Job:
    """Pause a queued fine-tune now; flag a running one for its worker to checkpoint and stop.
    Pausing a paused job changes nothing; any other status is an InvalidStateError."""
    for _ in range(5):
        job = require_job(session, job_id, tenant_id=tenant_id)
        _pausable(job)
        status = JobStatus(job.status)
        if status is JobStatus.PAUSED:
            return job
        if status is JobStatus.QUEUED and not job.cancel_requested:
            if transition(
                session,
                job_id,
                JobStatus.QUEUED,
                JobStatus.PAUSED,
                where=[Job.cancel_requested.is_(False)],
                values={"pause_requested": False},
                message="paused while queued",
            ):
                return require_job(session, job_id, tenant_id=tenant_id)
            continue
        if status is JobStatus.RUNNING and not job.cancel_requested:
            if job.pause_requested:
                return job
            stmt = (
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.status == JobStatus.RUNNING.value,
                    Job.cancel_requested.is_(False),
                )
                .values(pause_requested=True, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if session.execute(stmt).rowcount == 1:  # type: ignore[attr-defined]
                append_event(session, job_id, EventType.LOG, "pause requested")
                return require_job(session, job_id, tenant_id=tenant_id)
            continue
        state = "being cancelled" if job.cancel_requested else status.value
        raise InvalidStateError(f"job {job_id} is {state}; it cannot be paused", param="job_id")
    raise InvalidStateError(f"job {job_id} kept changing state; try again", param="job_id")


def resume(session: Session, job_id: str, *, tenant_id: str | None) -> Job:
    """paused -> queued, due now; the caller publishes it after committing."""
    job = require_job(session, job_id, tenant_id=tenant_id)
    _pausable(job)
    now = utcnow()
    if job.status != JobStatus.PAUSED.value or not transition(
        session,
        job_id,
        JobStatus.PAUSED,
        JobStatus.QUEUED,
        values={"queued_at": now, "available_at": now, "pause_requested": False},
        message="resumed",
    ):
        current = require_job(session, job_id, tenant_id=tenant_id).status
        raise InvalidStateError(
            f"job {job_id} is {current}; only a paused job can be resumed", param="job_id"
        )
    return require_job(session, job_id, tenant_id=tenant_id)
