"""Webhook deliveries, their attempts and the tenants' signing secrets."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, exists, insert, literal, or_, select, update
from sqlalchemy.orm import Session

from core.enums import DeliveryStatus, WebhookEvent
from core.errors import NotFoundError
from core.webhooks import new_secret
from db.base import newer_first_before, utcnow
from db.clock import db_now, db_time_after
from db.models import Job, WebhookAttempt, WebhookDelivery, WebhookSecret, new_delivery_id

DEFAULT_TENANT = "default"


def events_column(events: Sequence[WebhookEvent]) -> str:
    """How a job stores its subscribed events: ",started,completed,"."""
    return "," + ",".join(sorted({e.value for e in events})) + ","


def queue_delivery(
    session: Session,
    job_id: str,
    event: WebhookEvent,
    data: dict[str, Any],
    *,
    throttle_s: float = 0.0,
) -> None:
    """Queue a delivery of `event` for the job if it subscribed to it, as one
    INSERT ... SELECT (no row when the job has no webhook), in the caller's transaction.
    With `throttle_s`, nothing is queued when the job got the same event that recently."""
    now = utcnow()
    payload = {
        "type": f"job.{event.value}",
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "data": {"job_id": job_id, **data},
    }
    conds = [
        Job.id == job_id,
        Job.webhook_url.is_not(None),
        Job.webhook_events.like(f"%,{event.value},%"),
    ]
    if throttle_s > 0:
        recent = (
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.job_id == job_id,
                WebhookDelivery.event == event.value,
                WebhookDelivery.created_at > now - timedelta(seconds=throttle_s),
            )
            .correlate(None)
        )
        conds.append(~exists(recent))
    source = select(
        literal(new_delivery_id()),
        Job.tenant_id,
        Job.id,
        literal(event.value),
        Job.webhook_url,
        literal(payload, JSON),
        literal(DeliveryStatus.PENDING.value),
        literal(0),
        literal(now, WebhookDelivery.next_attempt_at.type),
        literal(now, WebhookDelivery.created_at.type),
    ).where(*conds)
    t = WebhookDelivery.__table__
    session.execute(
        insert(WebhookDelivery).from_select(
            [
                t.c.id,
                t.c.tenant_id,
                t.c.job_id,
                t.c.event,
                t.c.url,
                t.c.payload,
                t.c.status,
                t.c.attempts,
                t.c.next_attempt_at,
                t.c.created_at,
            ],
            source,
        )
    )


def due_deliveries(session: Session, limit: int) -> Sequence[WebhookDelivery]:
    """Pending deliveries due by the database's clock, oldest first."""
    stmt = (
        select(WebhookDelivery)
        .where(
            WebhookDelivery.status == DeliveryStatus.PENDING.value,
            WebhookDelivery.next_attempt_at <= db_now(),
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    return session.scalars(stmt).all()


def take_delivery(
    session: Session, delivery_id: str, seen_next: datetime, hold_s: float
) -> str | None:
    """Compare-and-set: hold a due delivery for `hold_s` seconds (database clock) for one
    sender, under a fresh take token; None when another sender (or a redeliver) changed
    it since it was read. Only the holder of the token may record the attempt."""
    token = uuid.uuid4().hex
    stmt = (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING.value,
            WebhookDelivery.next_attempt_at == seen_next,
        )
        .values(next_attempt_at=db_time_after(hold_s), take_token=token)
        .execution_options(synchronize_session=False)
    )
    won = session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
    return token if won else None


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status_code: int | None
    error: str | None
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def record_attempt(
    session: Session,
    delivery_id: str,
    token: str,
    result: AttemptResult,
    *,
    retry_in_s: float | None,
) -> DeliveryStatus | None:
    """Store one attempt in the log; the delivery becomes delivered (2xx), pending again in
    `retry_in_s` seconds, or failed (no `retry_in_s`: out of attempts) -- a compare-and-set
    on the take token, so a redeliver asked meanwhile (or a sender that took over after the
    hold ran out) wins and this attempt changes nothing but the log: None then."""
    now = utcnow()
    session.execute(
        insert(WebhookAttempt).values(
            delivery_id=delivery_id,
            attempted_at=now,
            status_code=result.status_code,
            error=result.error,
            duration_ms=result.duration_ms,
        )
    )
    if result.ok:
        status = DeliveryStatus.DELIVERED
    elif retry_in_s is not None:
        status = DeliveryStatus.PENDING
    else:
        status = DeliveryStatus.FAILED
    recorded = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.take_token == token)
        .values(
            status=status.value,
            attempts=WebhookDelivery.attempts + 1,
            last_status_code=result.status_code,
            last_error=result.error,
            next_attempt_at=db_time_after(retry_in_s or 0.0),
            delivered_at=now if result.ok else None,
            take_token=None,
        )
        .execution_options(synchronize_session=False)
    )
    return status if recorded.rowcount == 1 else None  # type: ignore[attr-defined]


def list_deliveries(
    session: Session,
    tenant_id: str,
    *,
    job_id: str | None = None,
    status: DeliveryStatus | None = None,
    before: tuple[datetime, str] | None = None,
    limit: int = 20,
) -> Sequence[WebhookDelivery]:
    conds = [WebhookDelivery.tenant_id == tenant_id]
    if job_id is not None:
        conds.append(WebhookDelivery.job_id == job_id)
    if status is not None:
        conds.append(WebhookDelivery.status == status.value)
    conds.extend(newer_first_before(WebhookDelivery.created_at, WebhookDelivery.id, before))
    stmt = (
        select(WebhookDelivery)
        .where(*conds)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
        .limit(limit)
    )
    return session.scalars(stmt).all()


def require_delivery(session: Session, tenant_id: str, delivery_id: str) -> WebhookDelivery:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.tenant_id != tenant_id:
        raise NotFoundError(f"no webhook delivery {delivery_id}", param="delivery_id")
    return delivery


def list_attempts(session: Session, delivery_id: str) -> Sequence[WebhookAttempt]:
    stmt = (
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id == delivery_id)
        .order_by(WebhookAttempt.id)
    )
    return session.scalars(stmt).all()


def redeliver(session: Session, tenant_id: str, delivery_id: str) -> WebhookDelivery:
    """Send the delivery again now, with a fresh attempt budget; its attempts stay listed."""
    delivery = require_delivery(session, tenant_id, delivery_id)
    delivery.status = DeliveryStatus.PENDING.value
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()
    delivery.take_token = None  # an attempt in flight records nothing over this
    session.flush()
    return delivery


def signing_secrets(session: Session, tenant_id: str) -> list[str]:
    """The secrets a delivery is signed with: the current one first, then any rotated-out
    one still in its overlap. Empty until the tenant created one."""
    return [row.secret for row in secret_info(session, tenant_id)]


def secret_info(session: Session, tenant_id: str) -> list[WebhookSecret]:
    """The tenant's valid secrets (current first), to show without their values."""
    now = utcnow()
    return list(
        session.scalars(
            select(WebhookSecret)
            .where(
                WebhookSecret.tenant_id == tenant_id,
                or_(WebhookSecret.expires_at.is_(None), WebhookSecret.expires_at > now),
            )
            .order_by(WebhookSecret.created_at.desc(), WebhookSecret.id.desc())
        ).all()
    )


def rotate_secret(session: Session, tenant_id: str, overlap: timedelta) -> str:
    """A new current secret; the ones in use stay valid for `overlap`."""
    now = utcnow()
    session.execute(
        update(WebhookSecret)
        .where(
            WebhookSecret.tenant_id == tenant_id,
            or_(WebhookSecret.expires_at.is_(None), WebhookSecret.expires_at > now + overlap),
        )
        .values(expires_at=now + overlap)
        .execution_options(synchronize_session=False)
    )
    secret = new_secret()
    session.add(WebhookSecret(tenant_id=tenant_id, secret=secret, created_at=now))
    session.flush()
    return secret
