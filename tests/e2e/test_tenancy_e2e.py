"""A tenant's running-jobs cap with real workers: with two idle workers and a cap of one,
the second job stays queued while the first runs, and runs once it ended."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.support.harness import Stack
from tests.support.services import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def capped(
    database_url: str, broker: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("capped"), database_url, broker.url, max_running_jobs="1")
    try:
        stack.start_api()
        stack.start_beat()
        stack.start_worker()
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


def test_running_cap_keeps_the_extra_job_queued_and_it_runs_after(capped: Stack) -> None:
    first = capped.submit({"duration_s": 3}, kind="noop")
    capped.wait_status(first["id"], ("running",), timeout=30)
    second = capped.submit({"duration_s": 0}, kind="noop")
    assert capped.job(second["id"])["status"] == "queued"
    done_first = capped.wait_status(first["id"], ("succeeded",), timeout=60)
    done_second = capped.wait_status(second["id"], ("succeeded",), timeout=60)
    assert datetime.fromisoformat(done_second["started_at"]) >= datetime.fromisoformat(
        done_first["finished_at"]
    )
    dropped = [e for e in capped.events(second["id"]) if "dropped" in e["message"]]
    assert dropped, "the second job's first delivery should have found the cap reached"
