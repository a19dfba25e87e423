"""Which jobs have a message in the broker, read from the broker itself.

kombu's Redis transport keeps a queue as one list per priority step (`<queue>` for step 0,
`<queue><sep><step>` for the others; publishers LPUSH, consumers BRPOP). A consumer that
takes a message with acknowledgements on writes it, before running it, into the hash
`unacked` (delivery tag -> `[message, exchange, routing_key]`) and the sorted set
`unacked_index` (delivery tag scored by the time it was delivered, on the consumer's clock);
the ack removes both, and a message unacked past the visibility timeout is pushed back onto
its queue by any consumer.

`BrokerScanner.scan` reads all of it in chunks: the queue lists first, then the unacked
hash, so a message moving from a list to `unacked` while the scan runs is seen in one or
the other (a list read left to right never misses an element that stays in it: pushes on
the left only move it right, pops on the right do not move it). The job id is the first
argument of the task message, read from the base64 JSON body of kombu's envelope; messages
of other tasks or that cannot be read are counted and skipped. Delivery times are read
with ZMSCORE (Redis 6.2 or later) and are the consumer's clock, compared by the reader with
its own: a grace of seconds absorbs ordinary skew, and a delivery judged old too early only
costs a duplicate message, which the claim's compare-and-set drops.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis
from kombu.transport.redis import Channel

logger = logging.getLogger(__name__)

CHUNK = 1000

# Removes one unacked delivery (the hash entry and its index entry) in one step; 1 when the
# hash still held it, 0 when it was acknowledged or restored meanwhile.
_FORGET = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return removed
"""


class Presence(StrEnum):
    QUEUED = "queued"  # on a queue list, waiting for a consumer
    UNACKED = "unacked"  # delivered to a consumer that has not acknowledged it
    ABSENT = "absent"  # no message anywhere in the broker


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message delivered and not acknowledged."""

    tag: str
    delivered_at: float | None  # epoch seconds on the consumer's clock; None: not indexed

    def older_than(self, age_s: float, now: float) -> bool:
        """Delivered more than `age_s` ago; a delivery missing from the index is never
        restored by kombu, so it counts as old."""
        return self.delivered_at is None or self.delivered_at <= now - age_s


@dataclass
class BrokerMessages:
    """What one scan found: job ids on queue lists, and deliveries not acknowledged."""

    queued: set[str] = field(default_factory=set)
    unacked: dict[str, list[Delivery]] = field(default_factory=dict)
    unreadable: int = 0  # messages of other tasks, or that could not be parsed
    scanned: int = 0  # list elements and unacked entries read

    def presence(self, job_id: str) -> Presence:
        if job_id in self.queued:
            return Presence.QUEUED
        if job_id in self.unacked:
            return Presence.UNACKED
        return Presence.ABSENT

    def deliveries(self, job_id: str) -> list[Delivery]:
        return self.unacked.get(job_id, [])


def job_id_of(envelope: Mapping[str, Any], task: str) -> str | None:
    """The first argument of a `task` message in kombu's envelope, else None."""
    headers = envelope.get("headers")
    if isinstance(headers, Mapping) and headers.get("task") not in (None, task):
        return None
    if "json" not in str(envelope.get("content-type", "")):
        return None
    raw = envelope.get("body")
    properties = envelope.get("properties")
    encoding = properties.get("body_encoding") if isinstance(properties, Mapping) else None
    if not isinstance(raw, str):
        return None
    try:
        text = base64.b64decode(raw, validate=True) if encoding == "base64" else raw
        body = json.loads(text)
    except (binascii.Error, ValueError):
        return None
    if isinstance(body, list) and body:  # task protocol 2: [args, kwargs, embed]
        args = body[0]
    elif isinstance(body, Mapping):  # task protocol 1: {"task", "args", ...}
        if body.get("task") not in (None, task):
            return None
        args = body.get("args")
    else:
        return None
    if isinstance(args, list) and args and isinstance(args[0], str):
        return args[0]
    return None


def _loads(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


class BrokerScanner:
    """Reads kombu's Redis keys for the given queues with the Celery transport options."""

    def __init__(
        self,
        client: redis.Redis,
        queues: Iterable[str],
        transport_options: Mapping[str, Any],
        task: str,
        chunk: int = CHUNK,
    ) -> None:
        prefix = str(transport_options.get("global_keyprefix", ""))
        sep = str(transport_options.get("sep", Channel.sep))
        steps = sorted(set(transport_options.get("priority_steps", Channel.priority_steps)))
        self._client = client
        self._task = task
        self._chunk = chunk
        self.lists = [
            prefix + (f"{queue}{sep}{step}" if step else queue)
            for queue in sorted(set(queues))
            for step in steps
        ]
        self.unacked_key = prefix + str(transport_options.get("unacked_key", Channel.unacked_key))
        self.unacked_index_key = prefix + str(
            transport_options.get("unacked_index_key", Channel.unacked_index_key)
        )
        self._forget = client.register_script(_FORGET)

    def scan(self) -> BrokerMessages:
        found = BrokerMessages()
        started = time.monotonic()
        for key in self.lists:
            for raw in self._list(key):
                found.scanned += 1
                envelope = _loads(raw)
                job_id = job_id_of(envelope, self._task) if isinstance(envelope, dict) else None
                if job_id is None:
                    found.unreadable += 1
                else:
                    found.queued.add(job_id)
        for batch in self._unacked():
            scores = self._client.zmscore(self.unacked_index_key, [tag for tag, _ in batch])
            for (tag, raw), score in zip(batch, scores, strict=True):
                found.scanned += 1
                entry = _loads(raw)
                envelope = entry[0] if isinstance(entry, list) and entry else None
                job_id = job_id_of(envelope, self._task) if isinstance(envelope, dict) else None
                if job_id is None:
                    found.unreadable += 1
                    continue
                found.unacked.setdefault(job_id, []).append(
                    Delivery(tag, None if score is None else float(score))
                )
        logger.debug(
            "broker scan: %d entries (%d jobs queued, %d unacked, %d unreadable) in %.3fs",
            found.scanned,
            len(found.queued),
            len(found.unacked),
            found.unreadable,
            time.monotonic() - started,
        )
        return found

    def forget(self, delivery: Delivery) -> bool:
        """Remove an unacked delivery whose consumer is gone, so that it is neither restored
        after the visibility timeout nor counted as a message; False when it was acked or
        restored meanwhile."""
        removed = self._forget(keys=[self.unacked_key, self.unacked_index_key], args=[delivery.tag])
        return bool(removed)

    def _list(self, key: str) -> Iterator[bytes | str]:
        start = 0
        while True:
            items = list(self._client.lrange(key, start, start + self._chunk - 1))
            yield from items
            if len(items) < self._chunk:
                return
            start += self._chunk

    def _unacked(self) -> Iterator[list[tuple[str, bytes | str]]]:
        cursor = 0
        while True:
            cursor, entries = self._client.hscan(self.unacked_key, cursor, count=self._chunk)
            if isinstance(entries, dict) and entries:
                yield [
                    (tag.decode() if isinstance(tag, bytes) else str(tag), raw)
                    for tag, raw in entries.items()
                ]
            if cursor == 0:
                return
