"""One API process creates at most `create_concurrency` jobs at once: a burst of submits
queues in arrival order before the thread pool instead of taking turns on the database's
write lock, and each one still creates its job."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

import api.routes.jobs as jobs_route
from api.main import create_app
from core.settings import Settings
from db.models import Job
from db.session import session_scope
from tests.support.auth import bearer, make_key

SLOTS = 2
BURST = 8


class Overlap:
    """Wraps a creation, counting how many run at once."""

    def __init__(self, create: Callable[..., Any]) -> None:
        self._create = create
        self._lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __call__(self, *args: Any) -> Any:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.05)  # long enough that a burst would overlap without the limit
            return self._create(*args)
        finally:
            with self._lock:
                self.now -= 1


@pytest.fixture
def overlap(monkeypatch: pytest.MonkeyPatch) -> Overlap:
    watch = Overlap(jobs_route._create_job)
    monkeypatch.setattr(jobs_route, "_create_job", watch)
    return watch


@pytest.fixture
def slotted_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"create_concurrency": SLOTS}))) as c:
        c.headers.update(bearer(make_key(settings.database_url)))
        yield c


def _jobs(settings: Settings) -> int:
    with session_scope(settings.database_url, readonly=True) as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def test_a_burst_of_submits_is_created_a_few_at_a_time(
    slotted_client: TestClient, settings: Settings, overlap: Overlap
) -> None:
    before = _jobs(settings)

    def submit(_: int) -> int:
        return slotted_client.post("/v1/jobs", json={"kind": "noop"}).status_code

    with ThreadPoolExecutor(BURST) as pool:
        codes = list(pool.map(submit, range(BURST)))
    assert codes == [202] * BURST
    assert overlap.most == SLOTS  # the burst filled the slots and never went past them
    assert _jobs(settings) == before + BURST
