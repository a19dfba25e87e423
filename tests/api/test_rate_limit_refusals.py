"""The rate limiter counts the requests it lets through, not the ones it refuses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api.auth import WINDOW_S, RateLimiter
from tests.support.services import redis_db_index


@pytest.fixture
def limiter() -> Iterator[RateLimiter]:
    with redis_db_index() as url:
        rate = RateLimiter(url)
        yield rate
        rate.close()


def test_refused_requests_do_not_count(limiter: RateLimiter) -> None:
    start = 1_000 * WINDOW_S  # the start of a window, with nothing in the one before
    assert limiter.retry_after("k", 3, now=start) is None
    assert limiter.retry_after("k", 3, now=start + 1) is None
    assert limiter.retry_after("k", 3, now=start + 2) is None
    for second in range(3, 20):  # a client retrying on every 429
        assert limiter.retry_after("k", 3, now=start + second) is not None
    # the next window sees only the 3 accepted ones, weighted by the part still covered:
    # 3 * (1 - 0.5) = 1.5, so one more request fits half way through it
    assert limiter.retry_after("k", 3, now=start + WINDOW_S * 1.5) is None


def test_a_retrying_client_is_not_locked_out_for_longer(limiter: RateLimiter) -> None:
    start = 2_000 * WINDOW_S
    for second in range(2):
        assert limiter.retry_after("c", 2, now=start + second) is None
    waits = [limiter.retry_after("c", 2, now=start + 2 + s) for s in range(30)]
    assert all(w is not None for w in waits)
    # what it is told to wait does not grow with its retries
    assert waits[-1] is not None and waits[0] is not None and waits[-1] <= waits[0]
