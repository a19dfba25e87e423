"""Token streaming for generation jobs: workers write deltas, the API reads them.

One Redis Stream per job (`modelyard:tokens:<job id>`) holds, per attempt, a
`start` entry, one `delta` entry per piece of text of one (prompt, sequence) (with,
as JSON, the log probability entries of the tokens it completes when the job asked for
them), and an `end` entry written after the final status was committed. Every entry
carries its attempt (the job's fencing token): a `start` of an attempt older than
the stream's current one is refused (it would trim the newer attempt's text), and
readers skip entries of any attempt but the newest they know of, so a stale
attempt's deltas written after a newer attempt started are never shown. Redis is only
transport: the database keeps the job's status and outputs, so the writer is best
effort (it logs and carries on when Redis is away) and the reader re-checks the
database while it waits.

The API follows many jobs at once. A follower's blocking reads go through a subscription
(`TokenStreamReader.subscribe`): one XREAD per reader serves every subscribed stream, so a
decoding step of 32 followed jobs costs one round trip rather than 32. A subscription made
while that XREAD waits wakes it through the reader's own wake stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from redis.typing import EncodableT, FieldT

logger = logging.getLogger(__name__)

STREAM_PREFIX = "modelyard:tokens:"
# Approximate cap on entries per job stream; a live reader keeps up long before it,
# while a reader that joins a very long job late may find its first entries trimmed.
MAX_ENTRIES = 100_000
# A finished job's stream only serves readers already attached; later ones read the database.
END_TTL_S = 60.0
# After a failed publish, drop further deltas this long instead of stalling every step.
PAUSE_AFTER_ERROR_S = 5.0
SOCKET_TIMEOUT_S = 2.0

START, DELTA, END = "start", "delta", "end"

WAKE_PREFIX = "modelyard:tokens-wake:"
# Module constants rather than settings: tests change them.
SHARED_BLOCK_MS = 1000  # how long the shared XREAD waits before it reads again
SHARED_RETRY_S = 1.0  # pause of the shared XREAD after a Redis error
READ_COUNT = 500  # entries per stream per XREAD


def stream_key(job_id: str) -> str:
    return f"{STREAM_PREFIX}{job_id}"


# Starts attempts' streams, each unless a newer attempt already did: every entry carries
# its attempt, and the oldest entry left belongs to the current attempt (each start trims
# what came before it). KEYS the streams; ARGV max entries, ttl ms, then one attempt per
# key. Returns one 1 (started) or 0 (nothing written: a newer attempt holds it) per key.
_BEGIN = """
local started = {}
for k = 1, #KEYS do
  local attempt = ARGV[k + 2]
  started[k] = 1
  local first = redis.call('XRANGE', KEYS[k], '-', '+', 'COUNT', 1)[1]
  if first then
    local f = first[2]
    for i = 1, #f, 2 do
      if f[i] == 'attempt' and tonumber(f[i + 1]) > tonumber(attempt) then
        started[k] = 0
      end
    end
  end
  if started[k] == 1 then
    local id = redis.call('XADD', KEYS[k], 'MAXLEN', '~', ARGV[1], '*', 'kind', 'start',
                          'attempt', attempt)
    redis.call('XTRIM', KEYS[k], 'MINID', id)
    redis.call('PEXPIRE', KEYS[k], ARGV[2])
  end
end
return started
"""


@dataclass(frozen=True, slots=True)
class TokenDelta:
    job_id: str
    attempt: int  # the fencing token of the attempt that produced it
    prompt_index: int
    sequence_index: int
    text: str  # text added since the previous delta of this (prompt, sequence)
    logprobs: list[dict[str, Any]] | None = None  # the entries of the tokens it completes


class TokenStreamWriter:
    """Writes a job's token stream from a worker; never raises into the job.

    Call order per attempt: `begin` -> `publish`* -> `end` (after the final status
    is committed). A retried attempt calls `begin` again, which drops the old text.
    """

    def __init__(self, redis_url: str, ttl_s: float = 3600.0) -> None:
        self._redis: redis.Redis = redis.Redis.from_url(
            redis_url,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
        )
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._paused_until = 0.0
        self._begin = self._redis.register_script(_BEGIN)

    def begin(self, job_id: str, attempt: int) -> bool:
        """A new attempt starts: write its start entry, then drop everything before it.
        False when a newer attempt had started the stream (nothing is written then)."""
        return self.begin_many([(job_id, attempt)])[0]

    def begin_many(self, attempts: Sequence[tuple[str, int]]) -> list[bool]:
        """`begin` for several (job id, attempt) pairs in one round trip (the jobs that join
        a decode group together): one True or False per pair, in order."""
        if not attempts:
            return []
        try:
            # Trimming by id (not DEL) keeps the stream's ids increasing, so a reader
            # blocked after an old entry still sees the new start entry. One script for all
            # the streams: one round trip (a script in a pipeline would cost a second, the
            # pipeline's SCRIPT EXISTS).
            results = self._begin(
                keys=[stream_key(job_id) for job_id, _ in attempts],
                args=[MAX_ENTRIES, self._ttl_ms, *(attempt for _, attempt in attempts)],
            )
        except Exception as exc:
            self._failed("begin", attempts[0][0], exc)
            return [False] * len(attempts)
        self._paused_until = 0.0
        for (job_id, attempt), started in zip(attempts, results, strict=True):
            if not started:
                logger.warning(
                    "token stream of job %s: attempt %d is stale, a newer attempt streams it",
                    job_id,
                    attempt,
                )
        return [bool(started) for started in results]

    def publish(self, deltas: Sequence[TokenDelta]) -> None:
        """Append the deltas of one decoding step (any number of jobs) in one round trip."""
        if not deltas or time.monotonic() < self._paused_until:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            keys: dict[str, None] = {}
            for d in deltas:
                key = stream_key(d.job_id)
                keys[key] = None
                fields: dict[FieldT, EncodableT] = {
                    "kind": DELTA,
                    "attempt": d.attempt,
                    "prompt": d.prompt_index,
                    "seq": d.sequence_index,
                    "text": d.text,
                }
                if d.logprobs is not None:
                    fields["logprobs"] = json.dumps(d.logprobs, separators=(",", ":"))
                pipe.xadd(key, fields, maxlen=MAX_ENTRIES)
            for key in keys:
                pipe.pexpire(key, self._ttl_ms)
            pipe.execute()
        except Exception as exc:
            self._failed("publish", deltas[0].job_id, exc)

    def end(self, job_id: str, attempt: int, status: str) -> None:
        """The job's final status is committed: tell readers, then let the stream expire soon."""
        key = stream_key(job_id)
        try:
            pipe = self._redis.pipeline(transaction=False)
            fields: dict[FieldT, EncodableT] = {"kind": END, "attempt": attempt, "status": status}
            pipe.xadd(key, fields, maxlen=MAX_ENTRIES)
            pipe.pexpire(key, min(self._ttl_ms, int(END_TTL_S * 1000)))
            pipe.execute()
        except Exception as exc:
            self._failed("end", job_id, exc)

    def close(self) -> None:
        try:
            self._redis.close()
        except Exception as exc:
            logger.debug("closing the token stream writer failed: %s", exc)

    def _failed(self, what: str, job_id: str, exc: Exception) -> None:
        self._paused_until = time.monotonic() + PAUSE_AFTER_ERROR_S
        if isinstance(exc, redis.RedisError):
            logger.warning(
                "token stream %s for job %s failed (%s: %s); streaming is best effort, "
                "deltas are dropped for %.0f s",
                what,
                job_id,
                type(exc).__name__,
                exc,
                PAUSE_AFTER_ERROR_S,
            )
        else:
            logger.exception("token stream %s for job %s failed unexpectedly", what, job_id)


@dataclass(frozen=True, slots=True)
class StreamStart:
    entry_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class StreamDelta:
    entry_id: str
    attempt: int
    prompt_index: int
    sequence_index: int
    text: str
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class StreamEnd:
    entry_id: str
    attempt: int
    status: str


StreamEntry = StreamStart | StreamDelta | StreamEnd


def parse_entry(entry_id: str, fields: dict[str, str]) -> StreamEntry | None:
    """One stream entry as a typed value; None for one this version doesn't know."""
    try:
        kind = fields["kind"]
        if kind == DELTA:
            logprobs = fields.get("logprobs")
            return StreamDelta(
                entry_id,
                int(fields["attempt"]),
                int(fields["prompt"]),
                int(fields["seq"]),
                fields["text"],
                json.loads(logprobs) if logprobs is not None else None,
            )
        if kind == START:
            return StreamStart(entry_id, int(fields["attempt"]))
        if kind == END:
            return StreamEnd(entry_id, int(fields["attempt"]), fields["status"])
    except (KeyError, ValueError):
        pass
    logger.debug("skipping unknown token stream entry %s: %r", entry_id, fields)
    return None


def _id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>", or "0") in the order Redis gives them."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _stream_replies(reply: Any) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """An XREAD reply as (stream key, entries) pairs: RESP2 answers [[key, entries]],
    RESP3 {key: [entries]}."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(key, value[0]) for key, value in reply.items()]
    return [(key, entries) for key, entries in reply]


class StreamSubscription:
    """One follower of one job's token stream, fed by its reader's shared XREAD."""

    def __init__(self, reader: TokenStreamReader, job_id: str, after: str) -> None:
        self.key = stream_key(job_id)
        self.fed_through = after  # the newest entry id handed to this subscription
        self._reader = reader
        self._entries: list[StreamEntry] = []
        self._error: redis.RedisError | None = None
        self._ready = asyncio.Event()

    async def read(self, after: str, block_ms: int) -> list[StreamEntry]:
        """Entries after `after`, waiting up to `block_ms` for some; a Redis error of the
        shared read is raised once, to each subscription."""
        self._skip_through(after)
        if not self._entries and self._error is None:
            self._ready.clear()
            await self._reader._include(self)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(block_ms / 1000):  # no task per wait, as wait_for makes
                    await self._ready.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        entries, self._entries = self._entries, []
        return entries

    def close(self) -> None:
        self._reader._unsubscribe(self)

    def _skip_through(self, after: str) -> None:
        """The follower holds everything through `after` (it may have read on its own)."""
        held = _id_key(after)
        if held > _id_key(self.fed_through):
            self.fed_through = after
        if self._entries and _id_key(self._entries[0].entry_id) <= held:
            self._entries = [e for e in self._entries if _id_key(e.entry_id) > held]

    def _feed(self, raw: list[tuple[str, dict[str, str]]]) -> None:
        newest = _id_key(self.fed_through)
        for entry_id, fields in raw:
            if _id_key(entry_id) <= newest:
                continue  # read from an older position for another subscription
            self.fed_through = entry_id
            entry = parse_entry(entry_id, fields)
            if entry is not None:
                self._entries.append(entry)
        if self._entries:
            self._ready.set()

    def _fail(self, error: redis.RedisError) -> None:
        self._error = error
        self._ready.set()


class TokenStreamReader:
    """Reads job token streams for the API (asyncio); Redis errors reach the caller."""

    def __init__(self, redis_url: str) -> None:
        self._redis: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            # Above the longest XREAD block the API uses, so a blocking read is not cut off.
            socket_timeout=30.0,
            client_name="modelyard-token-stream",
        )
        self._subscriptions: dict[str, list[StreamSubscription]] = {}
        self._shared: asyncio.Task[None] | None = None
        self._wake_key = f"{WAKE_PREFIX}{uuid.uuid4().hex}"
        self._wake_id = "0"
        self._waiting_on: dict[str, str] = {}  # the streams and positions of the XREAD in flight
        self._woken = False  # a wake was sent for the XREAD in flight
        self._closed = False

    async def read(
        self, job_id: str, after: str = "0", *, block_ms: int | None = None, count: int = 500
    ) -> list[StreamEntry]:
        """Entries after `after` (an entry id, "0" for the start), waiting up to `block_ms`."""
        key = stream_key(job_id)
        reply: Any = await self._redis.xread({key: after}, count=count, block=block_ms)
        entries = (
            parse_entry(entry_id, fields)
            for _, raw in _stream_replies(reply)
            for entry_id, fields in raw
        )
        return [e for e in entries if e is not None]

    def subscribe(self, job_id: str, after: str = "0") -> StreamSubscription:
        """A subscription to a job's stream from after `after`; close it when done."""
        subscription = StreamSubscription(self, job_id, after)
        self._subscriptions.setdefault(subscription.key, []).append(subscription)
        return subscription

    def _unsubscribe(self, subscription: StreamSubscription) -> None:
        subscriptions = self._subscriptions.get(subscription.key, [])
        if subscription in subscriptions:
            subscriptions.remove(subscription)
        if not subscriptions:
            self._subscriptions.pop(subscription.key, None)

    async def _include(self, subscription: StreamSubscription) -> None:
        """Make sure the shared XREAD reads this subscription's stream: start it, or wake
        it when it waits on the streams it read before this one came."""
        if self._shared is None:
            self._shared = asyncio.get_running_loop().create_task(self._read_shared())
            return
        if not self._waiting_on or self._woken:
            return  # its next XREAD takes every subscription as it stands
        position = self._waiting_on.get(subscription.key)
        if position is not None and _id_key(position) <= _id_key(subscription.fed_through):
            return  # the XREAD in flight reads this stream from early enough
        self._woken = True
        await self._wake()

    async def _wake(self) -> None:
        """End the XREAD in flight: an entry on this reader's wake stream, which it reads."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._wake_key, {"wake": 1}, maxlen=16)
        pipe.pexpire(self._wake_key, 60_000)
        await pipe.execute()

    async def _read_shared(self) -> None:
        """One XREAD at a time over every subscribed stream (and the wake stream), handing
        each subscription its entries, until no subscription is left."""
        try:
            while self._subscriptions and not self._closed:
                streams = {self._wake_key: self._wake_id}
                for key, subscriptions in self._subscriptions.items():
                    streams[key] = min((s.fed_through for s in subscriptions), key=_id_key)
                self._waiting_on, self._woken = streams, False
                try:
                    reply: Any = await self._redis.xread(
                        {key: position for key, position in streams.items()},
                        count=READ_COUNT,
                        block=SHARED_BLOCK_MS,
                    )
                except redis.RedisError as exc:
                    if self._closed:
                        return
                    self._fail_all(exc)
                    await asyncio.sleep(SHARED_RETRY_S)
                    continue
                finally:
                    self._waiting_on = {}
                for key, raw in _stream_replies(reply):
                    if key == self._wake_key:
                        self._wake_id = raw[-1][0] if raw else self._wake_id
                        continue
                    for subscription in self._subscriptions.get(key, []):
                        subscription._feed(raw)
        except Exception as exc:
            logger.exception("the shared token stream read failed")
            self._fail_all(redis.RedisError(f"the shared token stream read failed: {exc}"))
        finally:
            self._shared = None

    def _fail_all(self, error: redis.RedisError) -> None:
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription._fail(error)

    async def aclose(self) -> None:
        self._closed = True
        shared = self._shared
        if shared is not None:
            # Woken, the shared XREAD returns and its loop ends on `_closed`. A cancel alone
            # can wait out the XREAD's block: redis-py does not always give it up at once.
            with contextlib.suppress(redis.RedisError):
                await self._wake()
            await asyncio.wait({shared}, timeout=SOCKET_TIMEOUT_S)
            shared.cancel()
        await self._redis.aclose()
