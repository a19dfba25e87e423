"""Job repository. Every status change goes through `transition`, a conditional UPDATE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, select, update
from sqlalchemy.orm import Session

from core.enums import EventType, JobKind, JobStatus
from core.errors import InvalidStateError, NotFoundError
from core.states import can_transition
from db.base import newer_first_before, utcnow
from db.events import append_event
from db.models import Job


def create_job(
    session: Session,
    *,
    kind: JobKind,
    spec: dict[str, Any],
    priority: int,
    max_attempts: int,
    metadata: dict[str, Any],
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    model: str | None = None,
) -> Job:
    now = utcnow()
    job = Job(
        kind=kind.value,
        status=JobStatus.QUEUED.value,
        spec=spec,
        model=model,
        priority=priority,
        max_attempts=max_attempts,
        metadata_=metadata,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        attempts=0,
        progress=0.0,
        cancel_requested=False,
        created_at=now,
        updated_at=now,
        queued_at=now,
        available_at=now,
    )
    session.add(job)
    session.flush()
    append_event(session, job.id, EventType.STATUS, "job queued", {"status": JobStatus.QUEUED})
    return job


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


def require_job(session: Session, job_id: str) -> Job:
    job = get_job(session, job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id!r}", param="job_id")
    return job


def find_by_idempotency_key(session: Session, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.idempotency_key == key)).first()


@dataclass(frozen=True, slots=True)
class JobFilter:
    status: JobStatus | None = None
    kind: JobKind | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def list_jobs(
    session: Session,
    filt: JobFilter,
    *,
    limit: int,
    before: tuple[datetime, str] | None = None,
) -> Sequence[Job]:
    """Newest first, keyset-paginated on (created_at, id)."""
    conds: list[ColumnElement[bool]] = []
    if filt.status is not None:
        conds.append(Job.status == filt.status.value)
    if filt.kind is not None:
        conds.append(Job.kind == filt.kind.value)
    if filt.created_after is not None:
        conds.append(Job.created_at >= filt.created_after)
    if filt.created_before is not None:
        conds.append(Job.created_at < filt.created_before)
    for key, value in filt.metadata.items():
        conds.append(Job.metadata_[key].as_string() == value)
    conds.extend(newer_first_before(Job.created_at, Job.id, before))
    stmt = select(Job).where(*conds).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    return session.scalars(stmt).all()


def transition(
    session: Session,
    job_id: str,
    source: JobStatus,
    target: JobStatus,
    *,
    where: Sequence[ColumnElement[bool]] = (),
    values: dict[str, Any] | None = None,
    message: str = "",
    data: dict[str, Any] | None = None,
) -> bool:
    """Compare-and-set `source -> target`; True when this caller won.

    The state machine in core.states decides what is allowed; `where` adds the
    caller's own conditions (lease owner, lease expiry, cancel flag).
    """
    won = _transition(session, job_id, source, target, where, values, message, data, (Job.id,))
    return won is not None


def _transition(
    session: Session,
    job_id: str,
    source: JobStatus,
    target: JobStatus,
    where: Sequence[ColumnElement[bool]],
    values: dict[str, Any] | None,
    message: str,
    data: dict[str, Any] | None,
    returning: Sequence[Any],
) -> Row[Any] | None:
    """The compare-and-set as one UPDATE ... RETURNING `returning`; None when it lost."""
    if not can_transition(source, target):
        raise InvalidStateError(f"transition {source} -> {target} is not allowed")
    now = utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == source.value, *where)
        .values(status=target.value, updated_at=now, **(values or {}))
        .returning(*returning)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(stmt).first()
    if row is None:
        return None
    append_event(
        session,
        job_id,
        EventType.STATUS,
        message or f"{source} -> {target}",
        {"from": source.value, "status": target.value, **(data or {})},
    )
    return row


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    kind: str
    spec: dict[str, Any]
    attempts: int
    model: str | None


def claim(session: Session, job_id: str, worker: str, lease_ttl: timedelta) -> ClaimedRow | None:
    """queued -> running for `worker` (unless cancelled or not yet due), returning what a
    worker needs to run it, in one statement."""
    now = utcnow()
    row = _transition(
        session,
        job_id,
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        [Job.cancel_requested.is_(False), Job.available_at <= now],
        {
            "lease_owner": worker,
            "lease_expires_at": now + lease_ttl,
            "attempts": Job.attempts + 1,
            "started_at": now,
            "progress": 0.0,
        },
        f"claimed by {worker}",
        {"worker": worker},
        (Job.kind, Job.spec, Job.attempts, Job.model),
    )
    if row is None:
        return None
    kind, spec, attempts, model = tuple(row)
    return ClaimedRow(kind=kind, spec=dict(spec), attempts=int(attempts), model=model)


def claim_job(session: Session, job_id: str, worker: str, lease_ttl: timedelta) -> bool:
    """queued -> running for `worker`, unless cancelled or not yet due."""
    return claim(session, job_id, worker, lease_ttl) is not None


@dataclass(frozen=True, slots=True)
class LeaseState:
    held: bool
    cancel_requested: bool


def renew_lease(
    session: Session,
    job_id: str,
    worker: str,
    lease_ttl: timedelta,
    progress: float | None,
    detail: dict[str, Any] | None = None,
) -> LeaseState:
    values: dict[str, Any] = {"lease_expires_at": utcnow() + lease_ttl, "updated_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    if detail:
        values["progress_detail"] = detail
    stmt = (
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == JobStatus.RUNNING.value,
            Job.lease_owner == worker,
        )
        .values(**values)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(stmt).first()
    if row is None:
        return LeaseState(held=False, cancel_requested=False)
    return LeaseState(held=True, cancel_requested=bool(row[0]))


def finish_job(
    session: Session,
    job_id: str,
    worker: str,
    target: JobStatus,
    *,
    error_type: str | None = None,
    error_message: str | None = None,
    result: dict[str, Any] | None = None,
) -> bool:
    """running -> succeeded|failed|cancelled, only while `worker` holds the lease."""
    values: dict[str, Any] = {
        "lease_owner": None,
        "lease_expires_at": None,
        "finished_at": utcnow(),
        "error_type": error_type,
        "error_message": error_message,
    }
    if result is not None:
        values["result"] = result
    if target is JobStatus.SUCCEEDED:
        values["progress"] = 1.0
    return transition(
        session,
        job_id,
        JobStatus.RUNNING,
        target,
        where=[Job.lease_owner == worker],
        values=values,
        message=error_message or "",
        data={"error_type": error_type} if error_type else None,
    )


def requeue_job(
    session: Session,
    job_id: str,
    *,
    available_at: datetime,
    reason: str,
    error_type: str,
    where: Sequence[ColumnElement[bool]],
) -> bool:
    """running -> queued (retry or worker lost); the caller says whose lease it is."""
    now = utcnow()
    return transition(
        session,
        job_id,
        JobStatus.RUNNING,
        JobStatus.QUEUED,
        where=where,
        values={
            "lease_owner": None,
            "lease_expires_at": None,
            "queued_at": now,
            "available_at": available_at,
            "error_type": error_type,
            "error_message": reason,
        },
        message=reason,
        data={"error_type": error_type},
    )


def request_cancel(session: Session, job_id: str) -> Job:
    """Cancel a queued job now; flag a running one for its worker to stop."""
    for _ in range(5):
        job = require_job(session, job_id)
        status = JobStatus(job.status)
        if status is JobStatus.CANCELLED:
            return job
        if status is JobStatus.QUEUED:
            if transition(
                session,
                job_id,
                JobStatus.QUEUED,
                JobStatus.CANCELLED,
                values={"finished_at": utcnow(), "cancel_requested": True},
                message="cancelled while queued",
            ):
                return require_job(session, job_id)
            continue
        if status is JobStatus.RUNNING:
            if job.cancel_requested:
                return job
            stmt = (
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                .values(cancel_requested=True, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if session.execute(stmt).rowcount == 1:  # type: ignore[attr-defined]
                append_event(session, job_id, EventType.LOG, "cancel requested")
                return require_job(session, job_id)
            continue
        raise InvalidStateError(f"job {job_id} already {status.value}", param="job_id")
    raise InvalidStateError(f"job {job_id} kept changing state; try again", param="job_id")


def expired_leases(session: Session, now: datetime, limit: int = 500) -> Sequence[Job]:
    stmt = (
        select(Job)
        .where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
        .limit(limit)
    )
    return session.scalars(stmt).all()


def ready_for_model(
    session: Session, kind: JobKind, model: str, now: datetime, limit: int
) -> Sequence[str]:
    """Ids of queued, due, uncancelled jobs of `kind` on `model`, highest priority first."""
    stmt = (
        select(Job.id)
        .where(
            Job.status == JobStatus.QUEUED.value,
            Job.kind == kind.value,
            Job.model == model,
            Job.available_at <= now,
            Job.cancel_requested.is_(False),
        )
        .order_by(Job.priority.desc(), Job.created_at)
        .limit(limit)
    )
    return session.scalars(stmt).all()


def due_queued(
    session: Session, now: datetime, grace: timedelta, limit: int = 1000
) -> Sequence[Job]:
    """Queued jobs that are due and old enough that their message should have arrived."""
    stmt = (
        select(Job)
        .where(
            Job.status == JobStatus.QUEUED.value,
            Job.available_at <= now,
            Job.queued_at <= now - grace,
        )
        .order_by(Job.priority.desc(), Job.queued_at)
        .limit(limit)
    )
    return session.scalars(stmt).all()
