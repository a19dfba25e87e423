"""Two evaluations of one monitor racing (two workers finishing batches at once): the
state's compare-and-set lets exactly one of them alert. PostgreSQL, where the second
writer really runs concurrently with the first (SQLite serialises whole transactions)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from core.enums import JobKind
from db import jobs as jobs_repo
from db import monitors as repo
from db.base import utcnow
from db.models import Monitor, MonitorAlert, MonitorItem, WebhookDelivery
from db.session import migrate, session_scope

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def _labelled_batch(database_url: str, monitor_id: str, labels: list[str]) -> str:
    with session_scope(database_url) as s:
        job = jobs_repo.create_job(
            s, kind=JobKind.PREDICT, spec={}, priority=0, max_attempts=1, metadata={}
        )
        repo.add_items(s, monitor_id, job.id, [f"t{i}" for i in range(len(labels))])
        s.flush()
        ids = s.scalars(select(MonitorItem.id).where(MonitorItem.job_id == job.id)).all()
        for item_id, label in zip(ids, labels, strict=True):
            s.get_one(MonitorItem, item_id).label = label
        return job.id


def test_only_one_of_two_racing_evaluations_alerts(database_url: str) -> None:
    migrate(database_url)
    with session_scope(database_url) as s:
        mon = repo.create_monitor(
            s,
            tenant_id="default",
            name="race",
            model="m",
            labels=["negative", "positive"],
            negative_label="negative",
            window_items=4,
            window_seconds=None,
            share_above=0.5,
            rise_above=None,
            min_items=4,
            webhook_url="http://127.0.0.1:9/alerts",
        )
        monitor_id = mon.id
    first = _labelled_batch(database_url, monitor_id, ["negative"] * 4)
    second = _labelled_batch(database_url, monitor_id, ["negative"] * 4)

    with session_scope(database_url) as late:
        stale = late.get_one(Monitor, monitor_id)  # read while the monitor is still ok
        assert stale.state == "ok"
        with session_scope(database_url) as early:
            stat = repo.evaluate(early, early.get_one(Monitor, monitor_id), first, utcnow())
            assert stat.alerted and stat.state == "alerting"
        stat = repo.evaluate(late, stale, second, utcnow() + timedelta(seconds=1))
        assert not stat.alerted
        assert stat.state == "alerting"

    with session_scope(database_url) as s:
        alerts = s.scalar(select(func.count()).where(MonitorAlert.monitor_id == monitor_id))
        sent = s.scalar(
            select(func.count()).where(
                WebhookDelivery.job_id.in_([first, second]), WebhookDelivery.event == "alert"
            )
        )
        assert (alerts, sent) == (1, 1)
        assert s.get_one(Monitor, monitor_id).state == "alerting"
