"""The rate limiter counts the requests it lets through, not the ones it refuses."""

from __future__ import annotations

from api.auth import WINDOW_S, RateLimiter


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


def _counted(limiter: RateLimiter, key: str, window: int) -> int:
    return int(limiter._redis.get(f"modelyard:ratelimit:{key}:{window}") or 0)


def test_a_high_limit_is_counted_in_blocks_spent_without_round_trips(limiter: RateLimiter) -> None:
    start = 3_000 * WINDOW_S
    window = 3_000
    limit = 1_000  # blocks of 10
    assert limiter.retry_after("b", limit, now=start) is None
    assert _counted(limiter, "b", window) == 10  # one round trip counted the block
    for second in range(1, 10):  # the other 9 of it pass without touching Redis
        assert limiter.take_held("b", now=start + second)
    assert _counted(limiter, "b", window) == 10
    assert not limiter.take_held("b", now=start + 10)  # spent
    assert limiter.retry_after("b", limit, now=start + 10) is None
    assert _counted(limiter, "b", window) == 20


def test_a_held_block_ends_with_its_minute(limiter: RateLimiter) -> None:
    start = 4_000 * WINDOW_S
    assert limiter.retry_after("m", 1_000, now=start) is None
    assert limiter.take_held("m", now=start + 1)
    assert not limiter.take_held("m", now=start + WINDOW_S)  # a new minute: count again


def test_a_block_that_does_not_fit_counts_the_request_alone(limiter: RateLimiter) -> None:
    start = 5_000 * WINDOW_S
    limiter._redis.set("modelyard:ratelimit:f:5000", 995)
    assert limiter.retry_after("f", 1_000, now=start) is None  # 996 of 1000: passes alone
    assert _counted(limiter, "f", 5_000) == 996
    assert not limiter.take_held("f", now=start)  # no block was taken
    for _ in range(4):
        assert limiter.retry_after("f", 1_000, now=start) is None
    assert limiter.retry_after("f", 1_000, now=start) is not None  # the 1001st is refused
    assert _counted(limiter, "f", 5_000) == 1_000  # and not counted
