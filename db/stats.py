"""Aggregates over jobs, outputs and webhook deliveries for the Prometheus endpoint: one
GROUP BY each, computed in the database (never one row per job in Python)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Float, case, func, select, type_coerce
from sqlalchemy.orm import Session

from core.enums import JobStatus
from db.models import Job, Output, WebhookAttempt, WebhookDelivery


def seconds_between(start: Any, end: Any, dialect: str) -> ColumnElement[float]:
    """`end - start` in seconds, for naive UTC datetime columns on SQLite or PostgreSQL."""
    if dialect == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return type_coerce(func.extract("epoch", end - start), Float)


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (`le` -> count), the sum and the count, as Prometheus
    wants them."""

    buckets: list[tuple[float, int]]
    total: float
    count: int


def job_counts(session: Session) -> list[tuple[str, str, int]]:
    stmt = select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
    return [(kind, status, int(n)) for kind, status, n in session.execute(stmt)]


def queued_by_kind(session: Session) -> list[tuple[str, int, datetime | None]]:
    """(kind, queued jobs, queued_at of the oldest) for every kind with queued jobs."""
    stmt = (
        select(Job.kind, func.count(), func.min(Job.queued_at))
        .where(Job.status == JobStatus.QUEUED.value)
        .group_by(Job.kind)
    )
    # min() keeps the column's type, so the oldest comes back as an aware UTC datetime.
    return [(kind, int(n), oldest) for kind, n, oldest in session.execute(stmt)]


def duration_histograms(
    session: Session, start: Any, end: Any, bounds: Sequence[float]
) -> dict[str, Histogram]:
    """Per job kind, the histogram of `end - start` over jobs that have both."""
    seconds = seconds_between(start, end, session.get_bind().dialect.name)
    columns = [func.sum(case((seconds <= b, 1), else_=0)) for b in bounds]
    stmt = (
        select(Job.kind, func.count(), func.coalesce(func.sum(seconds), 0.0), *columns)
        .where(start.is_not(None), end.is_not(None))
        .group_by(Job.kind)
    )
    result = {}
    for kind, count, total, *cumulative in session.execute(stmt):
        result[kind] = Histogram(
            buckets=[(b, int(c or 0)) for b, c in zip(bounds, cumulative, strict=True)],
            total=float(total or 0.0),
            count=int(count),
        )
    return result


def training_throughput(session: Session) -> list[tuple[str, str, float]]:
    """(job id, tenant, samples/s) of every running job whose progress reports a training
    rate; one row per running fine-tune, so few rows."""
    stmt = select(Job.id, Job.tenant_id, Job.progress_detail).where(
        Job.status == JobStatus.RUNNING.value, Job.progress_detail.is_not(None)
    )
    found = []
    for job_id, tenant_id, detail in session.execute(stmt):
        rate = (detail or {}).get("samples_per_s")
        if isinstance(rate, int | float):
            found.append((job_id, tenant_id, float(rate)))
    return found


def generated_tokens(session: Session) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(Output.completion_tokens), 0))) or 0)


def delivery_counts(session: Session) -> list[tuple[str, int]]:
    stmt = select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
    return [(status, int(n)) for status, n in session.execute(stmt)]


def failed_attempts(session: Session) -> int:
    ok = WebhookAttempt.status_code.between(200, 299)
    stmt = select(func.count()).where(~ok | WebhookAttempt.status_code.is_(None))
    return int(session.scalar(stmt) or 0)
