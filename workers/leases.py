"""A second lease on each running job, kept in the broker's Redis.

The database lease says who owns a job; it cannot tell a dead worker from a
database that was unreachable for a while. While the database is down the
heartbeat keeps renewing this Redis key, so when the database comes back the
reconciler sees that the owner is alive and leaves its job alone instead of
starting it a second time elsewhere. A worker that can renew neither lease for
a lease TTL stops its job on its own (see workers/heartbeat.py).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import redis

logger = logging.getLogger(__name__)

LEASE_PREFIX = "modelyard:lease:"


def lease_key(job_id: str) -> str:
    return f"{LEASE_PREFIX}{job_id}"


class BrokerLeases:
    """Sets, reads and drops the per-job Redis lease; every call may raise redis errors."""

    def __init__(self, broker_url: str, timeout_s: float = 2.0) -> None:
        self._redis: redis.Redis = redis.Redis.from_url(
            broker_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    def renew(self, job_id: str, worker: str, ttl_s: float) -> None:
        self._redis.set(lease_key(job_id), worker, px=max(int(ttl_s * 1000), 1))

    def holders(self, job_ids: list[str]) -> dict[str, str | None]:
        """The live holder of each job's Redis lease (None: expired or never set)."""
        if not job_ids:
            return {}
        values = self._redis.mget([lease_key(j) for j in job_ids])
        return {
            job_id: value.decode() if isinstance(value, bytes) else value
            for job_id, value in zip(job_ids, values, strict=True)
        }

    def release(self, job_id: str, worker: str) -> None:
        key = lease_key(job_id)
        held = self._redis.get(key)
        if held is not None and (held.decode() if isinstance(held, bytes) else held) == worker:
            self._redis.delete(key)

    def close(self) -> None:
        self._redis.close()


@lru_cache(maxsize=4)
def broker_leases(broker_url: str) -> BrokerLeases:
    """One client per broker for the whole process (heartbeats, executor, reconciler)."""
    return BrokerLeases(broker_url)
