"""Cancel notices: a fast path from a cancel request to the worker decoding the job.

The database is where a cancel is asked (`cancel_requested`) and read at every step of the
lifecycle; a worker's heartbeat reads it every `heartbeat_interval_s`. A generation job can
do many decoding steps in that time, so after committing a cancel the API also leaves a
notice in Redis, and a decode group looks for its jobs' notices between steps. A notice
only makes the worker end the attempt sooner: ending it cancelled still takes the
database's flag (a compare-and-set on `cancel_requested`), so a lost or stray notice
changes nothing but timing.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

PREFIX = "modelyard:cancel:"
TTL_S = 600  # longer than any heartbeat interval: by then the heartbeat has read the flag


def notify(client: redis.Redis, job_id: str) -> None:
    """Leave the notice for a job whose cancel was just committed."""
    client.set(PREFIX + job_id, b"1", ex=TTL_S)


def noticed(client: redis.Redis, job_ids: Sequence[str]) -> set[str]:
    """Which of `job_ids` have a notice (one round trip)."""
    if not job_ids:
        return set()
    values = client.mget([PREFIX + job_id for job_id in job_ids])
    return {job_id for job_id, value in zip(job_ids, values, strict=True) if value is not None}
