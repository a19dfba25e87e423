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

# Set the lease to ARGV[1] ("<worker>/<attempt>") unless a newer attempt holds it: the
# compare-and-set that keeps a stale attempt from taking the broker lease back.
_RENEW = """
local held = redis.call('GET', KEYS[1])
if held then
  local attempt = tonumber(string.match(held, '/(%d+)$')) or 0
  if attempt > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""
# Delete the lease only if it is still ARGV[1]'s.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_value(worker: str, attempt: int) -> str:
    """What a broker lease holds: the worker and its attempt (the fencing token)."""
    return f"{worker}/{attempt}"


def lease_key(job_id: str) -> str:
    return f"{LEASE_PREFIX}{job_id}"


class BrokerLeases:
    """Sets, reads and drops the per-job Redis lease; every call may raise redis errors."""

    def __init__(self, broker_url: str, timeout_s: float = 2.0) -> None:
        self._redis: redis.Redis = redis.Redis.from_url(
            broker_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

    def renew(self, job_id: str, worker: str, attempt: int, ttl_s: float) -> bool:
        """Hold the lease for `attempt`; False when a newer attempt holds it."""
        ttl_ms = max(int(ttl_s * 1000), 1)
        value = lease_value(worker, attempt)
        return bool(self._renew(keys=[lease_key(job_id)], args=[value, attempt, ttl_ms]))

    def holders(self, job_ids: list[str]) -> dict[str, str | None]:
        """The live holder of each job's Redis lease, as `lease_value` wrote it (None:
        expired or never set)."""
        if not job_ids:
            return {}
        values = self._redis.mget([lease_key(j) for j in job_ids])
        return {
            job_id: value.decode() if isinstance(value, bytes) else value
            for job_id, value in zip(job_ids, values, strict=True)
        }

    def release(self, job_id: str, worker: str, attempt: int) -> None:
        self._release(keys=[lease_key(job_id)], args=[lease_value(worker, attempt)])

    def close(self) -> None:
        self._redis.close()


@lru_cache(maxsize=4)
def broker_leases(broker_url: str) -> BrokerLeases:
    """One client per broker for the whole process (heartbeats, executor, reconciler)."""
    return BrokerLeases(broker_url)
