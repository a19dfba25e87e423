"""Metrics and checkpoints recorded by fine-tuning jobs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.enums import WebhookEvent
from db.models import Checkpoint, Job, Metric
from db.webhooks import queue_delivery


def add_metrics(
    session: Session, job_id: str, points: Iterable[tuple[int, str, float, float | None]]
) -> None:
    """Insert (step, name, value, epoch) rows in one flush."""
    session.add_all(
        Metric(job_id=job_id, step=step, name=name, value=value, epoch=epoch)
        for step, name, value, epoch in points
    )
    session.flush()


def discard_metrics_after(session: Session, job_id: str, step: int) -> int:
    """Delete the job's metric rows past `step` (an attempt resuming from a checkpoint at
    `step` writes them again) and return the furthest step the job had reached before:
    from those rows and from the progress its heartbeat stored."""
    furthest = session.scalar(
        select(func.max(Metric.step)).where(Metric.job_id == job_id, Metric.step > step)
    )
    detail = session.scalar(select(Job.progress_detail).where(Job.id == job_id)) or {}
    seen = [step, int(furthest or 0)]
    if isinstance(detail.get("step"), int):
        seen.append(int(detail["step"]))
    session.execute(
        delete(Metric)
        .where(Metric.job_id == job_id, Metric.step > step)
        .execution_options(synchronize_session=False)
    )
    return max(seen)


def list_metrics(
    session: Session,
    job_id: str,
    *,
    names: Sequence[str] = (),
    after_id: int = 0,
    limit: int = 1000,
) -> Sequence[Metric]:
    stmt = select(Metric).where(Metric.job_id == job_id, Metric.id > after_id)
    if names:
        stmt = stmt.where(Metric.name.in_(names))
    return session.scalars(stmt.order_by(Metric.id).limit(limit)).all()


def step_metrics(session: Session, job_id: str) -> Sequence[Metric]:
    """Every metric row of the job, by step (in the order recorded within a step)."""
    stmt = select(Metric).where(Metric.job_id == job_id).order_by(Metric.step, Metric.id)
    return session.scalars(stmt).all()


def add_checkpoint(
    session: Session, job_id: str, step: int, path: str, metrics: dict[str, Any]
) -> Checkpoint:
    existing = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
    ).first()
    if existing is not None:  # the same step saved again after a resume
        existing.path = path
        existing.metrics = metrics
        session.flush()
        return existing
    checkpoint = Checkpoint(job_id=job_id, step=step, path=path, metrics=metrics)
    session.add(checkpoint)
    session.flush()
    queue_delivery(session, job_id, WebhookEvent.CHECKPOINT, {"step": step, "metrics": metrics})
    return checkpoint


def list_checkpoints(session: Session, job_id: str) -> Sequence[Checkpoint]:
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
    return session.scalars(stmt).all()
