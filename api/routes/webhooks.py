"""Webhook signing secrets and the delivery log."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import BaseModel

from api.cursors import decode_cursor, encode_cursor, split_page
from api.deps import Admin, JobsRead, JobsWrite, ReadSessionDep, SessionDep, SettingsDep
from core.enums import DeliveryStatus
from db import webhooks as repo
from db.models import WebhookAttempt, WebhookDelivery, WebhookSecret

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

SHOWN_SECRET_CHARS = 10


class SecretOut(BaseModel):
    hint: str
    created_at: datetime
    expires_at: datetime | None

    @classmethod
    def of(cls, row: WebhookSecret) -> SecretOut:
        return cls(
            hint=row.secret[:SHOWN_SECRET_CHARS] + "...",
            created_at=row.created_at,
            expires_at=row.expires_at,
        )


class SecretList(BaseModel):
    data: list[SecretOut]


class NewSecret(BaseModel):
    secret: str
    previous_valid_until: datetime | None


class AttemptOut(BaseModel):
    attempted_at: datetime
    status_code: int | None
    error: str | None
    duration_ms: float

    @classmethod
    def of(cls, row: WebhookAttempt) -> AttemptOut:
        return cls(
            attempted_at=row.attempted_at,
            status_code=row.status_code,
            error=row.error,
            duration_ms=row.duration_ms,
        )


class DeliveryOut(BaseModel):
    id: str
    job_id: str
    event: str
    url: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, object]
    attempt_log: list[AttemptOut] | None = None

    @classmethod
    def of(cls, row: WebhookDelivery, attempts: list[AttemptOut] | None = None) -> DeliveryOut:
        return cls(
            id=row.id,
            job_id=row.job_id,
            event=row.event,
            url=row.url,
            status=row.status,
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at
            if row.status == DeliveryStatus.PENDING.value
            else None,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            created_at=row.created_at,
            delivered_at=row.delivered_at,
            payload=row.payload,
            attempt_log=attempts,
        )


class DeliveryList(BaseModel):
    data: list[DeliveryOut]
    has_more: bool
    next_cursor: str | None


@router.post("/secret", status_code=status.HTTP_201_CREATED, response_model=NewSecret)
def rotate_secret(session: SessionDep, settings: SettingsDep, who: Admin) -> NewSecret:
    """A new signing secret, shown this once. A previous one keeps signing deliveries too
    for webhook_secret_overlap_s, so receivers can switch without missing any."""
    overlap = timedelta(seconds=settings.webhook_secret_overlap_s)
    had = bool(repo.signing_secrets(session, who.tenant_id))
    secret = repo.rotate_secret(session, who.tenant_id, overlap)
    session.commit()
    logger.info("webhook signing secret rotated for tenant %s", who.tenant_id)
    valid_until = datetime.now().astimezone() + overlap if had else None
    return NewSecret(secret=secret, previous_valid_until=valid_until)


@router.get("/secret", response_model=SecretList)
def list_secrets(session: ReadSessionDep, who: JobsRead) -> SecretList:
    rows = repo.secret_info(session, who.tenant_id)
    return SecretList(data=[SecretOut.of(r) for r in rows])


@router.get("/deliveries", response_model=DeliveryList)
def list_deliveries(
    session: ReadSessionDep,
    who: JobsRead,
    job_id: str | None = None,
    status_: Annotated[DeliveryStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> DeliveryList:
    before = decode_cursor(cursor) if cursor else None
    rows, has_more = split_page(
        repo.list_deliveries(
            session,
            who.tenant_id,
            job_id=job_id,
            status=status_,
            before=before,
            limit=limit + 1,
        ),
        limit,
    )
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more else None
    return DeliveryList(
        data=[DeliveryOut.of(r) for r in rows], has_more=has_more, next_cursor=next_cursor
    )


@router.get("/deliveries/{delivery_id}", response_model=DeliveryOut)
def get_delivery(delivery_id: str, session: ReadSessionDep, who: JobsRead) -> DeliveryOut:
    row = repo.require_delivery(session, who.tenant_id, delivery_id)
    attempts = [AttemptOut.of(a) for a in repo.list_attempts(session, delivery_id)]
    return DeliveryOut.of(row, attempts)


@router.post(
    "/deliveries/{delivery_id}/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeliveryOut,
)
def redeliver(delivery_id: str, session: SessionDep, who: JobsWrite) -> DeliveryOut:
    row = repo.redeliver(session, who.tenant_id, delivery_id)
    session.commit()
    logger.info("webhook delivery %s queued again", delivery_id)
    return DeliveryOut.of(row)
