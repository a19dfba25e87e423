"""Sentiment monitors: the resource, its fed items, window evaluations and alerts.

When a predict job of a monitor's feed succeeds, `record_predictions` runs in the
worker's success transaction: it labels the job's items, evaluates the window once
(one MonitorStat row) and moves the monitor's state with a compare-and-set, so two
workers finishing at once cannot both alert. An alert is a MonitorAlert row plus a
`monitor.alert` webhook delivery queued in the same transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from core.enums import DeliveryStatus, MonitorState, WebhookEvent
from core.errors import NotFoundError
from core.monitors import AlertRule, WindowCounts, firing, recovered
from db.base import newer_first_before, utcnow
from db.models import (
    Monitor,
    MonitorAlert,
    MonitorItem,
    MonitorStat,
    WebhookDelivery,
    new_delivery_id,
)
from db.outputs import OutputRecord


def create_monitor(session: Session, **values: Any) -> Monitor:
    monitor = Monitor(state=MonitorState.OK.value, created_at=utcnow(), **values)
    session.add(monitor)
    session.flush()
    return monitor


def require_monitor(session: Session, monitor_id: str, *, tenant_id: str) -> Monitor:
    """The monitor; another tenant's looks exactly like a missing one."""
    monitor = session.get(Monitor, monitor_id)
    if monitor is None or monitor.tenant_id != tenant_id:
        raise NotFoundError(f"no monitor {monitor_id}", param="monitor_id")
    return monitor


def list_monitors(
    session: Session, *, tenant_id: str, limit: int, before: tuple[datetime, str] | None = None
) -> Sequence[Monitor]:
    stmt = (
        select(Monitor)
        .where(
            Monitor.tenant_id == tenant_id,
            *newer_first_before(Monitor.created_at, Monitor.id, before),
        )
        .order_by(Monitor.created_at.desc(), Monitor.id.desc())
        .limit(limit)
    )
    return session.scalars(stmt).all()


def delete_monitor(session: Session, monitor_id: str, *, tenant_id: str) -> None:
    monitor = require_monitor(session, monitor_id, tenant_id=tenant_id)
    session.delete(monitor)
    session.flush()


def add_items(session: Session, monitor_id: str, job_id: str, texts: list[str]) -> None:
    now = utcnow()
    session.execute(
        insert(MonitorItem),
        [{"monitor_id": monitor_id, "job_id": job_id, "text": t, "created_at": now} for t in texts],
    )


def item_counts(session: Session, monitor_id: str) -> tuple[int, int]:
    """(items posted, items classified)."""
    row = session.execute(
        select(func.count(MonitorItem.id), func.count(MonitorItem.label)).where(
            MonitorItem.monitor_id == monitor_id
        )
    ).one()
    return int(row[0]), int(row[1])


def rule_of(monitor: Monitor) -> AlertRule:
    return AlertRule(
        share_above=monitor.share_above,
        rise_above=monitor.rise_above,
        min_items=monitor.min_items,
    )


def _counts(labels: Sequence[str], negative_label: str) -> WindowCounts:
    by_label = Counter(labels)
    return WindowCounts(len(labels), by_label[negative_label], dict(by_label))


def window_counts(
    session: Session, monitor: Monitor, now: datetime
) -> tuple[WindowCounts, WindowCounts]:
    """The current window and the one before it, over classified items."""
    classified = [MonitorItem.monitor_id == monitor.id, MonitorItem.label.is_not(None)]
    if monitor.window_items is not None:
        n = monitor.window_items
        labels = session.scalars(
            select(MonitorItem.label)
            .where(*classified)
            .order_by(MonitorItem.id.desc())
            .limit(2 * n)
        ).all()
        current, previous = list(labels[:n]), list(labels[n:])
    else:
        span = timedelta(seconds=monitor.window_seconds or 0)
        rows = session.execute(
            select(MonitorItem.label, MonitorItem.created_at).where(
                *classified, MonitorItem.created_at > now - 2 * span
            )
        ).all()
        current = [label for label, at in rows if at > now - span]
        previous = [label for label, at in rows if at <= now - span]
    neg = monitor.negative_label
    return _counts([x for x in current if x], neg), _counts([x for x in previous if x], neg)


def _set_state(
    session: Session,
    monitor_id: str,
    seen: MonitorState,
    to: MonitorState,
    recover_at_or_below: float | None,
) -> bool:
    """Compare-and-set on the monitor's state: False when another evaluation moved it."""
    result = session.execute(
        update(Monitor)
        .where(Monitor.id == monitor_id, Monitor.state == seen.value)
        .values(state=to.value, recover_at_or_below=recover_at_or_below)
        .execution_options(synchronize_session=False)
    )
    won: bool = result.rowcount == 1  # type: ignore[attr-defined]
    return won


def _queue_alert_delivery(
    session: Session, monitor: Monitor, alert: MonitorAlert, job_id: str
) -> str | None:
    """A signed `monitor.alert` delivery through the webhook sender. The delivery row
    names the predict job whose results raised the alert."""
    if monitor.webhook_url is None:
        return None
    now = utcnow()
    delivery_id = new_delivery_id()
    payload = {
        "type": f"monitor.{WebhookEvent.ALERT.value}",
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "data": {
            "monitor_id": monitor.id,
            "monitor_name": monitor.name,
            "alert_id": alert.id,
            "reason": alert.reason,
            "negative_label": monitor.negative_label,
            "negative_share": alert.negative_share,
            "previous_share": alert.previous_share,
            "items": alert.items,
            "job_id": job_id,
        },
    }
    session.execute(
        insert(WebhookDelivery).values(
            id=delivery_id,
            tenant_id=monitor.tenant_id,
            job_id=job_id,
            event=WebhookEvent.ALERT.value,
            url=monitor.webhook_url,
            payload=payload,
            status=DeliveryStatus.PENDING.value,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )
    return delivery_id


def record_predictions(
    session: Session, job_id: str, outputs: Sequence[OutputRecord]
) -> MonitorStat | None:
    """Label the items the predict job `job_id` classified and evaluate their monitor's
    window once; None when the job fed no monitor (or its monitor was deleted)."""
    items = session.execute(
        select(MonitorItem.id, MonitorItem.monitor_id)
        .where(MonitorItem.job_id == job_id)
        .order_by(MonitorItem.id)
    ).all()
    if not items:
        return None
    now = utcnow()
    by_index = {o.prompt_index: o for o in outputs if o.data and "label" in o.data}
    rows = [
        {
            "id": item_id,
            "label": by_index[i].data["label"],  # type: ignore[index]
            "score": by_index[i].data["score"],  # type: ignore[index]
            "classified_at": now,
        }
        for i, (item_id, _) in enumerate(items)
        if i in by_index
    ]
    if rows:
        session.execute(update(MonitorItem), rows)
    monitor = session.get(Monitor, items[0][1])
    if monitor is None:
        return None
    return evaluate(session, monitor, job_id, now)


def evaluate(session: Session, monitor: Monitor, job_id: str, now: datetime) -> MonitorStat:
    current, previous = window_counts(session, monitor, now)
    seen = MonitorState(monitor.state)
    state, alert_reason, lost = seen, None, False
    if seen is MonitorState.OK:
        fired = firing(rule_of(monitor), current, previous)
        if fired is not None:
            if _set_state(
                session, monitor.id, seen, MonitorState.ALERTING, fired.recover_at_or_below
            ):
                state, alert_reason = MonitorState.ALERTING, fired.reason
            else:
                lost = True
    elif recovered(current.negative_share, monitor.recover_at_or_below):
        if _set_state(session, monitor.id, seen, MonitorState.OK, None):
            state = MonitorState.OK
        else:
            lost = True
    if lost:  # another evaluation moved the state first: record what it is now
        now_state = session.scalar(select(Monitor.state).where(Monitor.id == monitor.id))
        state = MonitorState(now_state) if now_state is not None else seen
    stat = MonitorStat(
        monitor_id=monitor.id,
        job_id=job_id,
        items=current.items,
        negative_share=current.negative_share,
        previous_share=previous.negative_share if previous.items else None,
        shares=current.shares(),
        state=state.value,
        alerted=alert_reason is not None,
        created_at=now,
    )
    session.add(stat)
    session.flush()
    if alert_reason is not None:
        alert = MonitorAlert(
            monitor_id=monitor.id,
            stat_id=stat.id,
            job_id=job_id,
            reason=alert_reason,
            negative_share=stat.negative_share,
            previous_share=stat.previous_share,
            items=stat.items,
            created_at=now,
        )
        session.add(alert)
        session.flush()
        alert.delivery_id = _queue_alert_delivery(session, monitor, alert, job_id)
        session.flush()
    return stat


def list_stats(
    session: Session, monitor_id: str, *, before_id: int | None = None, limit: int = 100
) -> Sequence[MonitorStat]:
    """Evaluations, newest first."""
    conds = [MonitorStat.monitor_id == monitor_id]
    if before_id is not None:
        conds.append(MonitorStat.id < before_id)
    stmt = select(MonitorStat).where(*conds).order_by(MonitorStat.id.desc()).limit(limit)
    return session.scalars(stmt).all()


def list_alerts(
    session: Session,
    monitor_id: str,
    *,
    before: tuple[datetime, str] | None = None,
    limit: int = 20,
) -> Sequence[MonitorAlert]:
    stmt = (
        select(MonitorAlert)
        .where(
            MonitorAlert.monitor_id == monitor_id,
            *newer_first_before(MonitorAlert.created_at, MonitorAlert.id, before),
        )
        .order_by(MonitorAlert.created_at.desc(), MonitorAlert.id.desc())
        .limit(limit)
    )
    return session.scalars(stmt).all()
