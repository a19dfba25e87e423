"""The token stream writer and reader against the real Redis."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

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
from tests.support.services import free_port, redis_db_index


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
