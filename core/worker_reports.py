"""What each worker reports about itself to the broker's Redis, and reading it back.

A worker (workers/status.py) writes one hash per worker every heartbeat interval;
`modelyard workers` (workers/readiness.py) and the API's `/metrics` read them here,
so neither needs the worker's code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

logger = logging.getLogger(__name__)

STATUS_PREFIX = "modelyard:worker:"


def status_key(hostname: str) -> str:
    return f"{STATUS_PREFIX}{hostname}"


@dataclass(frozen=True)
class WorkerReport:
    hostname: str
    pid: int
    queues: tuple[str, ...]
    busy: bool
    job: str | None
    last_active: float  # epoch seconds: last message received, or last moment it was busy
    started: float
    reported: float


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def read_reports(client: redis.Redis) -> list[WorkerReport]:
    reports: list[WorkerReport] = []
    for key in sorted(client.scan_iter(match=f"{STATUS_PREFIX}*", count=100)):
        fields = _decode(client.hgetall(key))
        if not fields:
            continue
        try:
            reports.append(
                WorkerReport(
                    hostname=fields["hostname"],
                    pid=int(fields["pid"]),
                    queues=tuple(q for q in fields["queues"].split(",") if q),
                    busy=fields["busy"] == "1",
                    job=fields.get("job") or None,
                    last_active=float(fields["last_active"]),
                    started=float(fields["started"]),
                    reported=float(fields["reported"]),
                )
            )
        except (KeyError, ValueError):
            logger.warning("unreadable worker report %r", key)
    return reports
