"""The token stream writer and reader against the real Redis."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from core.token_stream import (
    END_TTL_S,
    StreamDelta,
    StreamEnd,
    StreamEntry,
    StreamStart,
    TokenDelta,
    TokenStreamReader,
    TokenStreamWriter,
    parse_entry,
    stream_key,
)
from tests.support.services import RedisServer, free_port, redis_db_index


@pytest.fixture(scope="module")
def broker_url() -> Iterator[str]:
    with redis_db_index() as url:
        yield url


@pytest.fixture
def writer(broker_url: str) -> Iterator[TokenStreamWriter]:
    w = TokenStreamWriter(broker_url, ttl_s=600)
    yield w
    w.close()


@pytest.fixture
def raw(broker_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker_url)
    yield client
    client.close()


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


def read_all(broker_url: str, job_id: str, after: str = "0") -> list[StreamEntry]:
    async def main() -> list[StreamEntry]:
        reader = TokenStreamReader(broker_url)
        try:
            return await reader.read(job_id, after)
        finally:
            await reader.aclose()

    return anyio.run(main)


def test_entries_come_back_typed_and_in_order(
    writer: TokenStreamWriter, broker_url: str, raw: redis.Redis
) -> None:
    job_id = new_job_id()
    writer.begin(job_id, 1)
    writer.publish([TokenDelta(job_id, 1, 0, 0, "Hel"), TokenDelta(job_id, 1, 0, 1, "Yo\n")])
    writer.publish([TokenDelta(job_id, 1, 0, 0, "lo ✓")])
    ttl_running = raw.pttl(stream_key(job_id))
    writer.end(job_id, 1, "succeeded")

    entries = read_all(broker_url, job_id)
    assert [type(e) for e in entries] == [
        StreamStart,
        StreamDelta,
        StreamDelta,
        StreamDelta,
        StreamEnd,
    ]
    assert entries[0] == StreamStart(entries[0].entry_id, 1)
    deltas = [
        (e.prompt_index, e.sequence_index, e.text) for e in entries if isinstance(e, StreamDelta)
    ]
    assert deltas == [(0, 0, "Hel"), (0, 1, "Yo\n"), (0, 0, "lo ✓")]
    assert entries[-1] == StreamEnd(entries[-1].entry_id, 1, "succeeded")
    assert {e.attempt for e in entries} == {1}  # every entry carries its attempt
    # The running stream lives ttl_s; once ended only long enough for attached readers.
    assert 0 < ttl_running <= 600_000
    assert 0 < raw.pttl(stream_key(job_id)) <= END_TTL_S * 1000
    # Reading after an entry id gives only what follows it.
    assert read_all(broker_url, job_id, after=entries[2].entry_id) == entries[3:]


def test_one_publish_serves_several_jobs(writer: TokenStreamWriter, broker_url: str) -> None:
    a, b = new_job_id(), new_job_id()
    writer.publish(
        [TokenDelta(a, 1, 0, 0, "a0"), TokenDelta(b, 1, 1, 0, "b1"), TokenDelta(a, 1, 1, 0, "a1")]
    )
    assert [
        (e.prompt_index, e.text) for e in read_all(broker_url, a) if isinstance(e, StreamDelta)
    ] == [
        (0, "a0"),
        (1, "a1"),
    ]
    assert [
        (e.prompt_index, e.text) for e in read_all(broker_url, b) if isinstance(e, StreamDelta)
    ] == [(1, "b1")]


def test_a_new_attempt_drops_the_old_text(writer: TokenStreamWriter, broker_url: str) -> None:
    job_id = new_job_id()
    writer.begin(job_id, 1)
    writer.publish([TokenDelta(job_id, 1, 0, 0, "old")])
    before = read_all(broker_url, job_id)
    assert writer.begin(job_id, 2)
    writer.publish([TokenDelta(job_id, 2, 0, 0, "new")])

    fresh = read_all(broker_url, job_id)
    assert isinstance(fresh[0], StreamStart) and fresh[0].attempt == 2
    assert [e.text for e in fresh if isinstance(e, StreamDelta)] == ["new"]
    # A reader that already saw the old delta still finds the new attempt after it.
    follow_up = read_all(broker_url, job_id, after=before[-1].entry_id)
    assert follow_up == fresh


def test_writer_swallows_a_dead_redis(caplog: pytest.LogCaptureFixture) -> None:
    job_id = new_job_id()
    writer = TokenStreamWriter(f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.WARNING, logger="core.token_stream"):
        writer.begin(job_id, 1)
        writer.publish([TokenDelta(job_id, 1, 0, 0, "x")])  # dropped: writes pause after an error
        writer.end(job_id, 1, "succeeded")
    writer.close()
    warnings = [r for r in caplog.records if r.name == "core.token_stream"]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
    assert all(job_id in r.getMessage() for r in warnings)
    assert "begin" in warnings[0].getMessage() and "end" in warnings[1].getMessage()


def test_unknown_entries_are_skipped() -> None:
    assert parse_entry("1-0", {"kind": "future-thing"}) is None
    bad_index = {"kind": "delta", "attempt": "1", "prompt": "x", "seq": "0", "text": ""}
    assert parse_entry("1-1", bad_index) is None
    assert parse_entry("1-2", {"kind": "delta", "prompt": "0", "seq": "0", "text": "a"}) is None
    end = {"kind": "end", "attempt": "2", "status": "failed"}
    assert parse_entry("1-3", end) == StreamEnd("1-3", 2, "failed")


def test_a_stale_attempt_cannot_start_over_a_newer_one(
    writer: TokenStreamWriter, broker_url: str
) -> None:
    job_id = new_job_id()
    assert writer.begin(job_id, 1)
    assert writer.begin(job_id, 2)  # another worker took the job over
    writer.publish([TokenDelta(job_id, 2, 0, 0, "live")])
    assert not writer.begin(job_id, 1)  # the stale worker starts again: refused, nothing trimmed
    writer.publish([TokenDelta(job_id, 1, 0, 0, "stale")])
    entries = read_all(broker_url, job_id)
    assert [type(e) for e in entries] == [StreamStart, StreamDelta, StreamDelta]
    assert [(e.attempt, e.text) for e in entries if isinstance(e, StreamDelta)] == [
        (2, "live"),
        (1, "stale"),  # written, but readers skip it (tests/api/test_stream.py)
    ]
    assert writer.begin(job_id, 2)  # the same attempt may begin again


def test_joining_jobs_begin_together_each_as_alone(
    writer: TokenStreamWriter, broker_url: str, raw: redis.Redis
) -> None:
    fresh, taken_over, retried = new_job_id(), new_job_id(), new_job_id()
    assert writer.begin(taken_over, 3)  # a newer attempt of this job streams elsewhere
    assert writer.begin(retried, 1)
    writer.publish([TokenDelta(retried, 1, 0, 0, "old text")])
    assert writer.begin_many([(fresh, 1), (taken_over, 2), (retried, 2)]) == [True, False, True]
    assert [(type(e), e.attempt) for e in read_all(broker_url, fresh)] == [(StreamStart, 1)]
    assert [(type(e), e.attempt) for e in read_all(broker_url, taken_over)] == [(StreamStart, 3)]
    # the retried job's stream starts over: the old attempt's text is gone
    assert [(type(e), e.attempt) for e in read_all(broker_url, retried)] == [(StreamStart, 2)]
    assert 0 < raw.pttl(stream_key(fresh)) <= 600_000
    assert writer.begin_many([]) == []


def _counting_xreads(reader: TokenStreamReader, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A one-element list that counts the reader's XREAD calls."""
    calls = [0]
    xread = reader._redis.xread

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return await xread(*args, **kwargs)

    monkeypatch.setattr(reader._redis, "xread", counted)
    return calls


def test_one_shared_read_serves_every_subscription(
    writer: TokenStreamWriter, broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [new_job_id() for _ in range(8)]
    for job_id in jobs:
        assert writer.begin(job_id, 1)

    async def main() -> tuple[list[list[StreamEntry]], list[list[StreamEntry]], int]:
        reader = TokenStreamReader(broker_url)
        calls = _counting_xreads(reader, monkeypatch)
        subscriptions = [reader.subscribe(job_id) for job_id in jobs]
        try:
            starts = [await s.read("0", 5000) for s in subscriptions]
            before = calls[0]
            writer.publish([TokenDelta(job_id, 1, 0, 0, f"t{i}") for i, job_id in enumerate(jobs)])
            deltas = [
                await s.read(start[-1].entry_id, 5000)
                for s, start in zip(subscriptions, starts, strict=True)
            ]
            return starts, deltas, calls[0] - before
        finally:
            for s in subscriptions:
                s.close()
            await reader.aclose()

    starts, deltas, reads = anyio.run(main)
    assert all([type(e) for e in start] == [StreamStart] for start in starts)
    assert [[e.text for e in d if isinstance(e, StreamDelta)] for d in deltas] == [
        [f"t{i}"] for i in range(len(jobs))
    ]
    assert reads < len(jobs)  # one XREAD per follower would be one per job


def test_a_subscription_made_while_the_shared_read_waits_is_read_at_once(
    writer: TokenStreamWriter, broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the shared XREAD would wait a minute; each read below gives up after 20 s, so an
    # entry comes back only if the new subscription woke the shared read
    monkeypatch.setattr("core.token_stream.SHARED_BLOCK_MS", 60_000)
    first, second = new_job_id(), new_job_id()
    assert writer.begin(first, 1)
    assert writer.begin(second, 1)

    async def main() -> tuple[list[StreamEntry], list[StreamEntry], list[StreamEntry]]:
        reader = TokenStreamReader(broker_url)
        early = reader.subscribe(first)
        try:
            seen = await early.read("0", 20_000)
            assert await early.read(seen[-1].entry_id, 100) == []  # the shared read waits
            other = reader.subscribe(second)  # another job
            late = reader.subscribe(first)  # the same job, from its start
            return seen, await other.read("0", 20_000), await late.read("0", 20_000)
        finally:
            await reader.aclose()

    seen, other, late = anyio.run(main)
    assert [type(e) for e in seen] == [StreamStart]
    assert [type(e) for e in other] == [StreamStart]
    assert late == seen


def test_a_redis_error_of_the_shared_read_reaches_every_subscription(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("core.token_stream.SHARED_RETRY_S", 0.05)

    async def main() -> list[str]:
        reader = TokenStreamReader(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
        subscriptions = [reader.subscribe(new_job_id()) for _ in range(2)]
        failures = []
        try:
            for s in subscriptions:
                try:
                    await s.read("0", 5000)
                except redis.RedisError as exc:
                    failures.append(type(exc).__name__)
        finally:
            await reader.aclose()
        return failures

    assert anyio.run(main) == ["ConnectionError", "ConnectionError"]


def test_a_subscription_reads_again_after_redis_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.token_stream.SHARED_RETRY_S", 0.05)
    server = RedisServer(tmp_path / "redis")
    server.start()
    job_id = new_job_id()
    writer = TokenStreamWriter(server.url, ttl_s=600)

    async def main() -> tuple[list[StreamEntry], list[str], list[StreamEntry]]:
        reader = TokenStreamReader(server.url)
        subscription = reader.subscribe(job_id)
        errors: list[str] = []
        try:
            assert writer.begin(job_id, 1)
            before = await subscription.read("0", 5000)
            server.kill9()  # the shared XREAD waits on it
            server.start()  # empty: no persistence
            assert writer.begin(job_id, 2)
            after: list[StreamEntry] = []
            for _ in range(50):  # each read waits at most 0.2 s
                try:
                    after = await subscription.read(before[-1].entry_id, 200)
                except redis.RedisError as exc:
                    errors.append(type(exc).__name__)
                if after:
                    break
            return before, errors, after
        finally:
            subscription.close()
            await reader.aclose()

    try:
        before, errors, after = anyio.run(main)
    finally:
        writer.close()
        server.stop()
    assert [(type(e), e.attempt) for e in before] == [(StreamStart, 1)]
    assert errors  # the outage reached the follower, which then watches the database
    assert [(type(e), e.attempt) for e in after] == [(StreamStart, 2)]
