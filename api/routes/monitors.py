"""Sentiment monitors: create/list/get/delete, feed items, read window stats and alerts.

Each posted batch of items becomes one predict job (published after the commit, like
any job); when it succeeds the worker labels the items and evaluates the window
(db/monitors.py). A batch with an Idempotency-Key is accepted once per monitor.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.cursors import decode_cursor, encode_cursor, split_page
from api.deps import JobsRead, JobsWrite, PublisherDep, ReadSessionDep, SessionDep, SettingsDep
from api.job_checks import check_queued_quota
from api.monitor_checks import check_monitor
from api.routes.jobs import REPLAYED_HEADER
from core.enums import JobKind
from core.errors import IdempotencyConflictError, InvalidRequestError
from core.monitors import AlertRule, MonitorCreate, MonitorItems, MonitorWindow
from core.specs import PredictSpec
from db import jobs as jobs_repo
from db import monitors as repo
from db.models import Job, Monitor, MonitorAlert, MonitorStat

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/monitors", tags=["monitors"])

HISTORY = 200  # evaluations GET /v1/monitors/{id} returns; more with /stats

IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)
]


class StatOut(BaseModel):
    id: int
    job_id: str
    items: int
    negative_share: float
    previous_share: float | None
    shares: dict[str, float]
    state: str
    alerted: bool
    created_at: datetime

    @classmethod
    def of(cls, row: MonitorStat) -> StatOut:
        return cls(
            id=row.id,
            job_id=row.job_id,
            items=row.items,
            negative_share=row.negative_share,
            previous_share=row.previous_share,
            shares=row.shares,
            state=row.state,
            alerted=row.alerted,
            created_at=row.created_at,
        )


class ItemCounts(BaseModel):
    posted: int
    classified: int
    pending: int


class MonitorOut(BaseModel):
    id: str
    name: str
    model: str
    labels: list[str]
    negative_label: str
    window: MonitorWindow
    rule: AlertRule
    webhook_url: str | None
    state: str
    items: ItemCounts | None = None
    current: StatOut | None = None
    history: list[StatOut] | None = None
    created_at: datetime

    @classmethod
    def of(cls, m: Monitor) -> MonitorOut:
        return cls(
            id=m.id,
            name=m.name,
            model=m.model,
            labels=m.labels,
            negative_label=m.negative_label,
            window=MonitorWindow(items=m.window_items, seconds=m.window_seconds),
            rule=repo.rule_of(m),
            webhook_url=m.webhook_url,
            state=m.state,
            created_at=m.created_at,
        )


class MonitorList(BaseModel):
    data: list[MonitorOut]
    has_more: bool
    next_cursor: str | None


class StatList(BaseModel):
    data: list[StatOut]
    has_more: bool
    next_cursor: str | None


class AlertOut(BaseModel):
    id: str
    monitor_id: str
    reason: str
    negative_share: float
    previous_share: float | None
    items: int
    job_id: str
    delivery_id: str | None
    created_at: datetime

    @classmethod
    def of(cls, a: MonitorAlert) -> AlertOut:
        return cls(
            id=a.id,
            monitor_id=a.monitor_id,
            reason=a.reason,
            negative_share=a.negative_share,
            previous_share=a.previous_share,
            items=a.items,
            job_id=a.job_id,
            delivery_id=a.delivery_id,
            created_at=a.created_at,
        )


class AlertList(BaseModel):
    data: list[AlertOut]
    has_more: bool
    next_cursor: str | None


class BatchAccepted(BaseModel):
    monitor_id: str
    job_id: str
    items: int


@router.post("", status_code=status.HTTP_201_CREATED, response_model=MonitorOut)
def create_monitor(
    req: MonitorCreate, session: SessionDep, settings: SettingsDep, who: JobsWrite
) -> MonitorOut:
    labels, negative = check_monitor(session, settings, who.tenant_id, req)
    monitor = repo.create_monitor(
        session,
        tenant_id=who.tenant_id,
        name=req.name,
        model=req.model,
        labels=labels,
        negative_label=negative,
        window_items=req.window.items,
        window_seconds=req.window.seconds,
        share_above=req.rule.share_above,
        rise_above=req.rule.rise_above,
        min_items=req.rule.min_items,
        webhook_url=req.webhook_url,
    )
    who.audit(session, "monitor.create", "monitor", monitor.id)
    session.commit()
    logger.info("monitor %s created on %s", monitor.id, monitor.model)
    return _detail(session, monitor)


@router.get("", response_model=MonitorList)
def list_monitors(
    session: ReadSessionDep,
    who: JobsRead,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> MonitorList:
    before = decode_cursor(cursor) if cursor else None
    rows, has_more = split_page(
        repo.list_monitors(session, tenant_id=who.tenant_id, limit=limit + 1, before=before),
        limit,
    )
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more else None
    return MonitorList(
        data=[MonitorOut.of(m) for m in rows], has_more=has_more, next_cursor=next_cursor
    )


def _detail(session: Session, monitor: Monitor) -> MonitorOut:
    out = MonitorOut.of(monitor)
    posted, classified = repo.item_counts(session, monitor.id)
    out.items = ItemCounts(posted=posted, classified=classified, pending=posted - classified)
    history = [StatOut.of(s) for s in reversed(repo.list_stats(session, monitor.id, limit=HISTORY))]
    out.history = history
    out.current = history[-1] if history else None
    return out


@router.get("/{monitor_id}", response_model=MonitorOut)
def get_monitor(monitor_id: str, session: ReadSessionDep, who: JobsRead) -> MonitorOut:
    """The monitor, its item counts, its current window (the latest evaluation) and the
    last 200 evaluations, oldest first."""
    return _detail(session, repo.require_monitor(session, monitor_id, tenant_id=who.tenant_id))


@router.delete("/{monitor_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_monitor(monitor_id: str, session: SessionDep, who: JobsWrite) -> Response:
    repo.delete_monitor(session, monitor_id, tenant_id=who.tenant_id)
    who.audit(session, "monitor.delete", "monitor", monitor_id)
    session.commit()
    logger.info("monitor %s deleted", monitor_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _batch_hash(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, separators=(",", ":")).encode()).hexdigest()


def _replayed(job: Job, monitor_id: str, digest: str, response: Response) -> BatchAccepted:
    if job.request_hash != digest:
        raise IdempotencyConflictError(
            "Idempotency-Key was already used with a different batch", param="Idempotency-Key"
        )
    response.status_code = status.HTTP_200_OK
    response.headers[REPLAYED_HEADER] = "true"
    return BatchAccepted(monitor_id=monitor_id, job_id=job.id, items=len(job.spec["texts"]))


@router.post("/{monitor_id}/items", status_code=status.HTTP_202_ACCEPTED)
def post_items(
    monitor_id: str,
    req: MonitorItems,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    publisher: PublisherDep,
    who: JobsWrite,
    idempotency_key: IdempotencyKey = None,
) -> BatchAccepted:
    """Store a batch of texts and queue one predict job that classifies them."""
    monitor = repo.require_monitor(session, monitor_id, tenant_id=who.tenant_id)
    digest = _batch_hash(req.texts)
    job_key = f"monitor:{monitor.id}:{idempotency_key}" if idempotency_key else None
    if job_key is not None:
        existing = jobs_repo.find_by_idempotency_key(session, who.tenant_id, job_key)
        if existing is not None:
            return _replayed(existing, monitor.id, digest, response)
    check_queued_quota(session, settings, who.tenant_id)
    spec = PredictSpec(model=monitor.model, texts=req.texts)
    try:
        job = jobs_repo.create_job(
            session,
            tenant_id=who.tenant_id,
            kind=JobKind.PREDICT,
            spec=spec.model_dump(mode="json"),
            priority=0,
            max_attempts=settings.max_attempts,
            metadata={"monitor_id": monitor.id},
            idempotency_key=job_key,
            request_hash=digest,
        )
        repo.add_items(session, monitor.id, job.id, req.texts)
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = (
            jobs_repo.find_by_idempotency_key(session, who.tenant_id, job_key) if job_key else None
        )
        if existing is None:
            raise
        return _replayed(existing, monitor.id, digest, response)
    try:
        publisher.publish(job.id, JobKind.PREDICT, job.priority)
    except Exception as exc:
        logger.warning("job %s accepted but not published yet: %s", job.id, type(exc).__name__)
    logger.info("monitor %s: %d items queued in job %s", monitor.id, len(req.texts), job.id)
    return BatchAccepted(monitor_id=monitor.id, job_id=job.id, items=len(req.texts))


@router.get("/{monitor_id}/stats", response_model=StatList)
def list_stats(
    monitor_id: str,
    session: ReadSessionDep,
    who: JobsRead,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> StatList:
    """Window evaluations, newest first (keyset pages)."""
    repo.require_monitor(session, monitor_id, tenant_id=who.tenant_id)
    before_id = None
    if cursor is not None:
        if not cursor.isdigit() or len(cursor) > 10:
            raise InvalidRequestError("cursor is not one this API returned", param="cursor")
        before_id = int(cursor)
    rows, has_more = split_page(
        repo.list_stats(session, monitor_id, before_id=before_id, limit=limit + 1), limit
    )
    return StatList(
        data=[StatOut.of(s) for s in rows],
        has_more=has_more,
        next_cursor=str(rows[-1].id) if has_more else None,
    )


@router.get("/{monitor_id}/alerts", response_model=AlertList)
def list_alerts(
    monitor_id: str,
    session: ReadSessionDep,
    who: JobsRead,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> AlertList:
    """Alerts the monitor raised, newest first."""
    repo.require_monitor(session, monitor_id, tenant_id=who.tenant_id)
    before = decode_cursor(cursor) if cursor else None
    rows, has_more = split_page(
        repo.list_alerts(session, monitor_id, before=before, limit=limit + 1), limit
    )
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more else None
    return AlertList(
        data=[AlertOut.of(a) for a in rows], has_more=has_more, next_cursor=next_cursor
    )
