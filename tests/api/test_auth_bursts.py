"""A burst of requests on one key: its lookup and its rate-limit count are each done once
for the requests that arrive together, not once per request (what a burst of streamed
chat completions used to wait on before its first job was created)."""

from __future__ import annotations

import asyncio
import threading
import time

from api.auth import WINDOW_S, KeyCache, Principal, RateLimiter
from core.errors import AuthenticationError

PRINCIPAL = Principal(
    tenant_id="default", key_id="k1", scopes=frozenset({"jobs:read"}), requests_per_minute=60
)


class Lookups:
    """A key lookup that takes a while (as a database round trip does) and counts calls."""

    def __init__(self, answer: Principal | Exception = PRINCIPAL) -> None:
        self.answer = answer
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, digest: str) -> Principal:
        with self._lock:
            self.calls += 1
        time.sleep(0.05)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def _burst(cache: KeyCache, load: Lookups, n: int) -> list[Principal | BaseException]:
    return await asyncio.gather(*(cache.fetch("d", load) for _ in range(n)), return_exceptions=True)


def test_a_burst_on_a_cold_cache_looks_its_key_up_once() -> None:
    cache, load = KeyCache(5.0), Lookups()
    got = asyncio.run(_burst(cache, load, 20))
    assert got == [PRINCIPAL] * 20
    assert load.calls == 1
    assert asyncio.run(_burst(cache, load, 3)) == [PRINCIPAL] * 3
    assert load.calls == 1  # remembered


def test_an_unknown_key_refuses_the_whole_burst_and_is_not_remembered() -> None:
    cache, load = KeyCache(5.0), Lookups(AuthenticationError("the API key is unknown or revoked"))
    got = asyncio.run(_burst(cache, load, 10))
    assert all(isinstance(g, AuthenticationError) for g in got)
    assert load.calls == 1
    asyncio.run(_burst(cache, load, 1))
    assert load.calls == 2  # looked up again: a refusal is not remembered


def test_without_a_cache_period_every_request_looks_its_key_up() -> None:
    cache, load = KeyCache(0.0), Lookups()
    assert asyncio.run(_burst(cache, load, 5)) == [PRINCIPAL] * 5
    assert load.calls == 5


def test_a_request_that_leaves_does_not_cancel_the_lookup_the_others_wait_on() -> None:
    cache, load = KeyCache(5.0), Lookups()

    async def scenario() -> Principal:
        first = asyncio.ensure_future(cache.fetch("d", load))
        await asyncio.sleep(0.01)  # its lookup is under way
        second = asyncio.ensure_future(cache.fetch("d", load))
        await asyncio.sleep(0)
        first.cancel()
        return await second

    assert asyncio.run(scenario()) == PRINCIPAL
    assert load.calls == 1


def test_a_revoke_during_the_lookup_keeps_its_result_out_of_the_cache() -> None:
    cache, load = KeyCache(5.0), Lookups()

    async def scenario() -> None:
        lookup = asyncio.ensure_future(cache.fetch("d", load))
        await asyncio.sleep(0.01)
        cache.forget("k1")  # committed while the lookup read the key
        assert await lookup == PRINCIPAL  # that request was authenticated before the revoke

    asyncio.run(scenario())
    assert cache.get("d") is None


def test_a_request_after_a_revoke_does_not_share_a_lookup_begun_before_it() -> None:
    cache, load = KeyCache(5.0), Lookups()

    async def scenario() -> None:
        before = asyncio.ensure_future(cache.fetch("d", load))
        await asyncio.sleep(0.01)
        cache.forget("k1")  # revoked through this process while `before` reads the key
        after = asyncio.ensure_future(cache.fetch("d", load))
        await asyncio.gather(before, after)

    asyncio.run(scenario())
    assert load.calls == 2  # the request after the revoke read the key itself


class CountedRoundTrips:
    def __init__(self, limiter: RateLimiter) -> None:
        self.calls = 0
        self._real = limiter.retry_after
        limiter.retry_after = self  # type: ignore[method-assign]

    def __call__(self, key: str, limit: int, now: float | None = None) -> int | None:
        self.calls += 1
        time.sleep(0.02)
        return self._real(key, limit, now)


def _counted(limiter: RateLimiter, key: str) -> int:
    """Counted in this window and the one before (the burst may straddle a minute)."""
    window = int(time.time() // WINDOW_S)
    keys = [f"modelyard:ratelimit:{key}:{w}" for w in (window - 1, window)]
    return sum(int(v or 0) for v in limiter._redis.mget(keys))


def _counts(limiter: RateLimiter, key: str, limit: int, n: int) -> list[int | None]:
    async def burst() -> list[int | None]:
        return await asyncio.gather(*(limiter.count(key, limit) for _ in range(n)))

    return asyncio.run(burst())


def test_a_burst_under_a_high_limit_is_counted_in_one_round_trip(limiter: RateLimiter) -> None:
    trips = CountedRoundTrips(limiter)
    assert _counts(limiter, "hi", 100_000, 30) == [None] * 30
    assert trips.calls == 1
    assert _counted(limiter, "hi") == 1_000  # one block, the burst passed on it


def test_a_burst_over_a_low_limit_passes_only_the_limit(limiter: RateLimiter) -> None:
    trips = CountedRoundTrips(limiter)
    waits = _counts(limiter, "lo", 3, 6)
    assert waits.count(None) == 3
    assert all(w is not None and w >= 1 for w in waits if w is not None)
    assert trips.calls == 6  # no blocks under a low limit: each request counted alone
    assert _counted(limiter, "lo") == 3  # the refused ones are not counted
