"""`GET /v1/jobs/{id}/stream` in-process, on SQLite and PostgreSQL, with the real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from api import job_follow
from core.enums import JobKind, JobStatus
from core.settings import Settings
from core.token_stream import TokenDelta, TokenStreamWriter, stream_key
from db.attempts import finish_job
from db.jobs import claim_job, create_job, request_cancel
from db.outputs import OutputRecord, add_outputs
from db.session import session_scope
from tests.support.harness import wait_for
from tests.support.jobs import insert_job

WORKER = "worker-1"

# A stream that misses its end waits forever: fail fast instead.
pytestmark = pytest.mark.timeout(30)


@dataclass
class Sse:
    event: str | None = None
    data: Any = None
    id: str | None = None
    comment: str | None = None


def sse_events(resp: httpx.Response) -> Iterator[Sse]:
    """Parse the event stream as it arrives (JSON data, one line each)."""
    current = Sse()
    seen = False
    for line in resp.iter_lines():
        if not line:
            if seen:
                yield current
            current, seen = Sse(), False
            continue
        seen = True
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            current.comment = value
        elif name == "data":
            current.data = json.loads(value)
        elif name == "event":
            current.event = value
        elif name == "id":
            current.id = value


@pytest.fixture
def writer(settings: Settings) -> Iterator[TokenStreamWriter]:
    w = TokenStreamWriter(settings.broker_url)
    yield w
    w.close()


@pytest.fixture
def broker(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short XREAD blocks and a database check on every loop."""
    monkeypatch.setattr(job_follow, "BLOCK_MS", 50)
    monkeypatch.setattr(job_follow, "DB_CHECK_S", 0.0)


def running_job(settings: Settings) -> str:
    job_id = insert_job(settings.database_url)
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, WORKER, timedelta(minutes=5))
    return job_id


def finish(settings: Settings, job_id: str, texts: dict[tuple[int, int], str]) -> None:
    with session_scope(settings.database_url) as s:
        add_outputs(
            s,
            job_id,
            [OutputRecord(p, q, text, "length", 1, 1) for (p, q), text in sorted(texts.items())],
        )
        assert finish_job(s, job_id, JobStatus.SUCCEEDED, attempt=1)


def tokens(events: list[Sse]) -> list[tuple[int, int, str]]:
    return [
        (e.data["prompt_index"], e.data["sequence_index"], e.data["text"])
        for e in events
        if e.event == "token"
    ]


def test_deltas_stream_as_tokens_then_done(
    client: TestClient,
    settings: Settings,
    writer: TokenStreamWriter,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(job_follow, "DB_CHECK_S", 3600.0)  # `done` must come from `end`
    job_id = running_job(settings)
    writer.begin(job_id, 1)
    writer.publish([TokenDelta(job_id, 1, 0, 0, "Hel"), TokenDelta(job_id, 1, 0, 1, 'Say "hi"\n')])

    with client.stream("GET", f"/v1/jobs/{job_id}/stream") as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
        seen = [next(events), next(events)]
        writer.publish([TokenDelta(job_id, 1, 0, 0, "lo")])  # while the client is attached
        seen.append(next(events))
        finish(settings, job_id, {(0, 0): "Hello", (0, 1): 'Say "hi"\n'})
        writer.end(job_id, 1, JobStatus.SUCCEEDED)
        seen.extend(events)  # the response ends after `done`

    assert tokens(seen) == [(0, 0, "Hel"), (0, 1, 'Say "hi"\n'), (0, 0, "lo")]
    delta_ids = [
        entry_id for entry_id, f in broker.xrange(stream_key(job_id)) if f["kind"] == "delta"
    ]
    assert [e.id for e in seen[:3]] == delta_ids
    assert [e.event for e in seen[3:]] == ["done"]
    assert seen[-1].data == {"status": "succeeded", "error_type": None, "error_message": None}


def test_terminal_job_replays_its_outputs(client: TestClient, settings: Settings) -> None:
    job_id = running_job(settings)
    finish(settings, job_id, {(0, 1): "second", (0, 0): "first", (1, 0): "third"})

    with client.stream("GET", f"/v1/jobs/{job_id}/stream") as resp:
        assert resp.status_code == 200
        events = list(sse_events(resp))

    assert tokens(events) == [(0, 0, "first"), (0, 1, "second"), (1, 0, "third")]
    assert [e.event for e in events] == ["token", "token", "token", "done"]
    assert events[-1].data["status"] == "succeeded"


def test_unknown_job_is_a_typed_404(client: TestClient) -> None:
    resp = client.get("/v1/jobs/job_missing/stream")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found"
    assert resp.json()["error"]["param"] == "job_id"


def test_only_generate_jobs_stream(client: TestClient, settings: Settings) -> None:
    with session_scope(settings.database_url) as s:
        job_id = create_job(
            s,
            kind=JobKind.NOOP,
            spec={"duration_s": 0},
            priority=0,
            max_attempts=1,
            metadata={},
        ).id
    resp = client.get(f"/v1/jobs/{job_id}/stream")
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["param"] == "job_id"
    assert "noop" in error["message"]


def test_a_new_attempt_sends_restart(
    client: TestClient, settings: Settings, writer: TokenStreamWriter
) -> None:
    job_id = running_job(settings)
    writer.begin(job_id, 1)
    writer.publish([TokenDelta(job_id, 1, 0, 0, "from the lost worker")])

    with client.stream("GET", f"/v1/jobs/{job_id}/stream") as resp:
        events = sse_events(resp)
        seen = [next(events)]
        writer.begin(job_id, 2)
        writer.publish([TokenDelta(job_id, 2, 0, 0, "again")])
        seen.extend([next(events), next(events)])
        finish(settings, job_id, {(0, 0): "again"})
        writer.end(job_id, 2, JobStatus.SUCCEEDED)
        seen.extend(events)

    assert [e.event for e in seen] == ["token", "restart", "token", "done"]
    assert seen[1].data == {"attempt": 2}
    assert tokens(seen) == [(0, 0, "from the lost worker"), (0, 0, "again")]


def test_a_stale_attempt_is_not_shown_after_a_newer_one_started(
    client: TestClient, settings: Settings, writer: TokenStreamWriter
) -> None:
    job_id = running_job(settings)
    writer.begin(job_id, 1)
    writer.publish([TokenDelta(job_id, 1, 0, 0, "old")])

    with client.stream("GET", f"/v1/jobs/{job_id}/stream") as resp:
        events = sse_events(resp)
        seen = [next(events)]
        writer.begin(job_id, 2)  # a second worker took the job over
        writer.publish([TokenDelta(job_id, 2, 0, 0, "new")])
        # the first worker, paused past its lease, resumes and writes on
        writer.publish([TokenDelta(job_id, 1, 0, 0, " stale")])
        writer.end(job_id, 1, JobStatus.FAILED)
        writer.publish([TokenDelta(job_id, 2, 0, 0, " text")])
        seen.extend([next(events), next(events), next(events)])
        finish(settings, job_id, {(0, 0): "new text"})
        writer.end(job_id, 2, JobStatus.SUCCEEDED)
        seen.extend(events)

    assert [e.event for e in seen] == ["token", "restart", "token", "token", "done"]
    assert tokens(seen[2:]) == [(0, 0, "new"), (0, 0, " text")]
    assert seen[-1].data["status"] == "succeeded"


def test_job_that_ends_without_an_end_entry_still_gets_done(
    client: TestClient, settings: Settings, fast_polling: None
) -> None:
    job_id = insert_job(settings.database_url)  # queued: no worker, no stream

    with client.stream("GET", f"/v1/jobs/{job_id}/stream") as resp:
        assert resp.status_code == 200  # the job was queued when the request arrived
        with session_scope(settings.database_url) as s:
            request_cancel(s, job_id, tenant_id=None)
        events = [e for e in sse_events(resp) if e.comment is None]

    assert [e.event for e in events] == ["done"]
    assert events[0].data == {"status": "cancelled", "error_type": None, "error_message": None}


def test_tokens_written_before_the_status_are_sent_before_done(
    client: TestClient, settings: Settings, writer: TokenStreamWriter, fast_polling: None
) -> None:
    """The worker commits, then dies before `end`: the stream's remaining tokens still arrive."""
    job_id = running_job(settings)
    writer.begin(job_id, 1)
    pieces = [f"{i} " for i in range(700)]  # more than one XREAD returns
    writer.publish([TokenDelta(job_id, 1, 0, 0, p) for p in pieces])

    with client.stream("GET", f"/v1/jobs/{job_id}/stream") as resp:
        events = sse_events(resp)
        first = next(events)  # the route is now inside its first batch of entries
        finish(settings, job_id, {(0, 0): "".join(pieces)})
        rest = [e for e in events if e.comment is None]

    seen = [first, *rest]
    assert [e.event for e in seen] == ["token"] * len(pieces) + ["done"]
    assert "".join(t for _, _, t in tokens(seen)) == "".join(pieces)


def test_reconnect_with_last_event_id_continues_after_it(
    client: TestClient, settings: Settings, writer: TokenStreamWriter, broker: redis.Redis
) -> None:
    job_id = running_job(settings)
    writer.begin(job_id, 1)
    writer.publish([TokenDelta(job_id, 1, 0, 0, t) for t in ("a", "b", "c")])
    second = broker.xrange(stream_key(job_id))[2][0]  # start, a, b <- resume after b

    with client.stream(
        "GET", f"/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": second}
    ) as resp:
        events = sse_events(resp)
        first = next(events)
        finish(settings, job_id, {(0, 0): "abc"})
        writer.end(job_id, 1, JobStatus.SUCCEEDED)
        rest = list(events)
    assert (first.event, first.data["text"]) == ("token", "c")
    assert [e.event for e in rest] == ["done"]

    # Once the job is over, a reconnecting client is told to replace its text.
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": second}
    ) as resp:
        replay = list(sse_events(resp))
    assert [e.event for e in replay] == ["restart", "token", "done"]
    assert replay[1].data["text"] == "abc"


def test_keepalive_and_disconnect(
    client: TestClient,
    settings: Settings,
    writer: TokenStreamWriter,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(job_follow, "KEEPALIVE_S", 0.0)
    monkeypatch.setattr(job_follow, "BLOCK_MS", 60_000)  # a read that would outlive the test
    job_id = running_job(settings)
    writer.begin(job_id, 1)
    writer.publish([TokenDelta(job_id, 1, 0, 0, "x")])

    db = str(broker.connection_pool.connection_kwargs.get("db", 0))

    def blocked_readers() -> int:
        # this test's Redis database only: tests running alongside block readers of their own
        return sum(
            1
            for c in broker.client_list()
            if c.get("name") == "modelyard-token-stream"
            and c.get("db") == db
            and "b" in c.get("flags", "")
        )

    with client.stream("GET", f"/v1/jobs/{job_id}/stream") as resp:
        events = sse_events(resp)
        assert next(events).event == "token"
        assert next(events).comment == "keepalive"
        wait_for(lambda: blocked_readers() == 1, 5.0, "the stream to block on XREAD")
    # The client left: its subscription ends, and with no other the reader's shared
    # XREAD stops after its block (core.token_stream.SHARED_BLOCK_MS).
    wait_for(lambda: blocked_readers() == 0, 5.0, "the stream's blocking XREAD to go away")
