from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session

from core.enums import EventType
from db.base import utcnow
from db.models import JobEvent

# One statement, built once: executed with a parameter dict it skips building and caching a
# new statement per call (and the ORM's bulk-insert path), which is most of an insert's cost.
_INSERT_EVENT = insert(cast(Table, JobEvent.__table__))


def append_event(
    session: Session,
    job_id: str,
    type_: EventType,
    message: str = "",
    data: dict[str, Any] | None = None,
) -> None:
    """One INSERT (no ORM: events are written on every job's hot path)."""
    session.execute(_INSERT_EVENT, event_row(job_id, type_, message, data))


def event_row(
    job_id: str, type_: EventType, message: str = "", data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One event as `append_events` takes it."""
    return {
        "job_id": job_id,
        "type": type_.value,
        "message": message,
        "data": data or {},
        "created_at": utcnow(),
    }


def append_events(session: Session, rows: list[dict[str, Any]]) -> None:
    """Several events (of `event_row`) in one INSERT, in the order given."""
    if rows:
        session.execute(_INSERT_EVENT, rows)


def list_events(
    session: Session, job_id: str, *, after_id: int = 0, limit: int = 100
) -> Sequence[JobEvent]:
    stmt = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id)
        .limit(limit)
    )
    return session.scalars(stmt).all()


def list_events_newest_first(
    session: Session, job_id: str, *, before_id: int | None = None, limit: int = 100
) -> Sequence[JobEvent]:
    """The job's events, newest first, older than `before_id` when given (OpenAI's order)."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if before_id is not None:
        stmt = stmt.where(JobEvent.id < before_id)
    return session.scalars(stmt.order_by(JobEvent.id.desc()).limit(limit)).all()
