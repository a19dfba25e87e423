"""`GET /v1/jobs/{id}/events/stream` against a real worker: every event in order, then
`end`; resuming with Last-Event-ID gives the rest without gaps or repeats."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from modelyard.client import parse_sse
from tests.support.harness import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# The HTTP and command-line surface is the same on every backend; the repositories under
# it run on SQLite and PostgreSQL in tests/api and tests/e2e/test_spine.py.
BACKENDS = ["postgresql"]


def read_sse(stack: Stack, job_id: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    headers.update(stack.headers)
    events: list[dict[str, Any]] = []
    with httpx.stream(
        "GET", f"{stack.base_url}/v1/jobs/{job_id}/events/stream", headers=headers, timeout=60
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for message in parse_sse(resp.iter_lines()):
            events.append(message)
            if message.get("event") == "end":
                break
    return events


def test_events_stream_follows_a_job_to_its_end_and_resumes(one_worker: Stack) -> None:
    stack = one_worker
    job = stack.submit({"duration_s": 1.5}, kind="noop")
    live = read_sse(stack, job["id"])  # opened while the job is queued or running
    assert live[-1]["event"] == "end" and live[-1]["data"] == {"status": "succeeded"}
    events = live[:-1]
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(set(ids))  # in order, no repeats
    assert ids == [e["id"] for e in stack.events(job["id"])]  # no gaps either
    statuses = [e["data"]["data"]["status"] for e in events if e["event"] == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded" and "running" in statuses
    assert all(e["data"]["job_id"] == job["id"] for e in events)

    resumed = read_sse(stack, job["id"], last_event_id=str(ids[1]))
    assert [int(e["id"]) for e in resumed[:-1]] == ids[2:]
    assert resumed[-1]["event"] == "end"


def test_events_stream_of_an_unknown_job_is_a_typed_404(one_worker: Stack) -> None:
    resp = httpx.get(
        f"{one_worker.base_url}/v1/jobs/job_nope/events/stream",
        headers=one_worker.headers,
        timeout=10,
    )
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found"
