"""DbTrainingIO while the database is unreachable: records wait in memory, in order, and
are written once when it answers again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.enums import FailureType, JobKind
from core.errors import TransientJobError
from core.settings import Settings
from db.events import list_events
from db.models import Metric
from db.session import migrate, session_scope
from tests.support.jobs import insert_job
from workers.context import RunContext
from workers.training import db_io
from workers.training.db_io import DbTrainingIO
from workers.training.io import MetricPoint


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    migrate(database_url)
    return Settings(
        data_dir=Path(tmp_path_factory.mktemp("data")), database_url=database_url, db_retry_s=0
    )


class Outage:
    def __init__(self) -> None:
        self.down = False
        self._real = db_io.session_scope

    @contextmanager
    def scope(self, url: str, **kw: Any) -> Iterator[Session]:
        if self.down:
            raise OperationalError("BEGIN", {}, Exception("connection refused"))
        with self._real(url, **kw) as session:
            yield session


def points(*steps: int) -> list[MetricPoint]:
    return [MetricPoint(step=s, name="train_loss", value=1.0 / s) for s in steps]


def test_records_wait_for_the_database_and_are_written_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    outage = Outage()
    monkeypatch.setattr(db_io, "session_scope", outage.scope)
    job_id = insert_job(settings.database_url, kind=JobKind.FINETUNE)
    io = DbTrainingIO(settings, RunContext(job_id=job_id, attempt=1, device="cpu"))
    io.record_metrics(points(1, 2))
    outage.down = True
    io.record_metrics(points(3, 4))
    io.event("evaluation at step 4", {"eval_loss": 0.5})
    io.record_metrics(points(5))
    assert io.buffered == 3
    outage.down = False
    io.record_metrics(points(6))
    assert io.buffered == 0
    with session_scope(settings.database_url) as s:
        steps = s.scalars(
            select(Metric.step).where(Metric.job_id == job_id).order_by(Metric.id)
        ).all()
        messages = [e.message for e in list_events(s, job_id)]
    assert list(steps) == [1, 2, 3, 4, 5, 6]
    assert "evaluation at step 4" in messages
    assert any("4 buffered records were written" in m for m in messages)


def test_close_gives_up_after_db_retry_s_with_a_transient_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    outage = Outage()
    monkeypatch.setattr(db_io, "session_scope", outage.scope)
    job_id = insert_job(settings.database_url, kind=JobKind.FINETUNE)
    io = DbTrainingIO(settings, RunContext(job_id=job_id, attempt=1, device="cpu"))
    outage.down = True
    io.record_metrics(points(1))
    with pytest.raises(TransientJobError) as failed:
        io.close()
    assert failed.value.failure is FailureType.DATABASE_UNAVAILABLE
