"""The shared Redis's db indexes stay reserved while a test flushes its own."""

from __future__ import annotations

import redis

from tests.support.services import redis_db_index


def test_a_flushed_index_stays_reserved() -> None:
    with redis_db_index() as first:
        redis.Redis.from_url(first).flushdb()  # as the reconciler and broker-scan tests do
        with redis_db_index() as second:
            assert second != first
