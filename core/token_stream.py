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
"""

from __future__ import annotations

import json
import logging
import time
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


def stream_key(job_id: str) -> str:
    return f"{STREAM_PREFIX}{job_id}"


# Starts an attempt's stream unless a newer attempt already did: every entry carries its
# attempt, and the oldest entry left belongs to the current attempt (each start trims what
# came before it). KEYS[1] the stream; ARGV attempt, max entries, ttl ms. Returns the new
# entry's id, or false (nothing written) when a newer attempt holds the stream.
_BEGIN = """
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
if first then
  local f = first[2]
  for i = 1, #f, 2 do
    if f[i] == 'attempt' and tonumber(f[i + 1]) > tonumber(ARGV[1]) then
      return false
    end
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'kind', 'start',
                      'attempt', ARGV[1])
redis.call('XTRIM', KEYS[1], 'MINID', id)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return id
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
        key = stream_key(job_id)
        try:
            # Trimming by id (not DEL) keeps the stream's ids increasing, so a reader
            # blocked after an old entry still sees the new start entry.
            started = self._begin(keys=[key], args=[attempt, MAX_ENTRIES, self._ttl_ms])
        except Exception as exc:
            self._failed("begin", job_id, exc)
            return False
        self._paused_until = 0.0
        if not started:
            logger.warning(
                "token stream of job %s: attempt %d is stale, a newer attempt streams it",
                job_id,
                attempt,
            )
            return False
        return True

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

    async def read(
        self, job_id: str, after: str = "0", *, block_ms: int | None = None, count: int = 500
    ) -> list[StreamEntry]:
        """Entries after `after` (an entry id, "0" for the start), waiting up to `block_ms`."""
        key = stream_key(job_id)
        reply: Any = await self._redis.xread({key: after}, count=count, block=block_ms)
        if not reply:
            return []
        # RESP2 answers [[key, entries]], RESP3 {key: [entries]}
        raw = reply.get(key, [[]])[0] if isinstance(reply, dict) else reply[0][1]
        entries = (parse_entry(entry_id, fields) for entry_id, fields in raw)
        return [e for e in entries if e is not None]

    async def aclose(self) -> None:
        await self._redis.aclose()
