"""API keys: who is calling (a Principal), what they may do (scopes), how often (rate limit).

Scopes: `jobs:read` (read jobs, outputs, events, datasets, models, deliveries),
`jobs:write` (submit and cancel jobs, upload and delete datasets, batch files),
`models:write` (delete registered models), `admin` (the tenant's keys and audit log;
on the `default` tenant also every tenant). `admin` implies all the others.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from core.errors import AuthenticationError, PermissionDeniedError, RateLimitedError
from core.settings import Settings
from db import tenants as tenants_repo
from db.base import utcnow
from db.models import DEFAULT_TENANT, ApiKey, Tenant
from db.session import get_sessionmaker
from db.tenants import LAST_USED_EVERY, SCOPES, hash_key, touch_key

logger = logging.getLogger(__name__)

WINDOW_S = 60


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    key_id: str | None  # None in development mode (auth disabled)
    scopes: frozenset[str]
    requests_per_minute: int

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def audit(self, session: Session, action: str, target_type: str, target_id: str) -> None:
        """Record in the audit log that this key did `action` to the target (the caller
        commits, with the change it records)."""
        tenants_repo.audit(
            session,
            tenant_id=self.tenant_id,
            key_id=self.key_id,
            action=action,
            target_type=target_type,
            target_id=target_id,
        )

    @property
    def operator(self) -> bool:
        """An admin of the `default` tenant: manages every tenant."""
        return self.tenant_id == DEFAULT_TENANT and "admin" in self.scopes


# A process takes a block of up to this share of a key's per-minute limit from Redis at a
# time and spends it locally: one round trip per block of requests, not per request.
RESERVE_DIVISOR = 100
_MAX_HELD_KEYS = 10_000


class RateLimiter:
    """Requests per minute per key as a sliding window counter in Redis: this minute's
    count plus last minute's weighted by how much of it the window still covers. Two
    keys per API key, no 2x burst at a minute boundary (which a fixed window allows).
    When Redis is unreachable requests pass (logged): the broker being down already
    stops new work from running.

    A key with a limit of at least 2 * RESERVE_DIVISOR per minute is counted in blocks:
    one round trip counts a block of limit // RESERVE_DIVISOR requests, which this
    process then passes without asking Redis (`take_held`) until the block is spent or
    the minute ends. A block that does not fit under the limit is not taken (that request
    is counted alone). A block's requests left unspent when its minute ends stay counted:
    each API process can so count up to 1% of a key's limit that it did not serve."""

    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._lock = threading.Lock()
        self._held: dict[str, tuple[int, int]] = {}  # key -> (window, counted, not yet passed)
        self._counting: dict[str, asyncio.Future[int | None]] = {}  # key -> its count under way

    def take_held(self, key: str, now: float | None = None) -> bool:
        """Pass one request on a block this process counted earlier in this minute (no
        round trip); False when it holds none for `key`."""
        window = int((time.time() if now is None else now) // WINDOW_S)
        with self._lock:
            held = self._held.get(key)
            if held is None or held[0] != window or held[1] <= 0:
                return False
            self._held[key] = (window, held[1] - 1)
            return True

    async def count(self, key: str, limit: int) -> int | None:
        """`retry_after` from the event loop, for a request `take_held` did not pass. While
        one request of `key` is counted in the thread pool (its round trip may take a
        block), the others of a burst wait for it and pass on that block, instead of each
        taking a thread and a round trip of its own."""
        pending = self._counting.get(key)
        if pending is not None and not pending.done():
            await asyncio.wait({pending})
            if self.take_held(key):
                return None
            return await run_in_threadpool(self.retry_after, key, limit)
        pending = asyncio.ensure_future(run_in_threadpool(self.retry_after, key, limit))
        self._counting[key] = pending
        pending.add_done_callback(lambda done: self._counted(key, done))
        # shielded: a request that goes away does not cancel the count the others wait on
        return await asyncio.shield(pending)

    def _counted(self, key: str, done: asyncio.Future[int | None]) -> None:
        if self._counting.get(key) is done:
            del self._counting[key]
        _retrieved(done)

    def retry_after(self, key: str, limit: int, now: float | None = None) -> int | None:
        """Count a request; None when it is within `limit`, else seconds to wait (and the
        refused request is not counted)."""
        now = time.time() if now is None else now
        if self.take_held(key, now):
            return None
        window = int(now // WINDOW_S)
        elapsed = now - window * WINDOW_S
        current = f"modelyard:ratelimit:{key}:{window}"
        block = max(1, limit // RESERVE_DIVISOR)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.incrby(current, block)
            pipe.expire(current, 2 * WINDOW_S)
            pipe.get(f"modelyard:ratelimit:{key}:{window - 1}")
            count, _, previous = pipe.execute()
        except redis.RedisError as exc:
            logger.warning("rate limit not checked, redis unavailable: %s", type(exc).__name__)
            return None
        cur, prev = int(count), int(previous or 0)

        def within() -> bool:
            return prev * (WINDOW_S - elapsed) / WINDOW_S + cur <= limit

        if block > 1:
            if within():
                with self._lock:
                    if len(self._held) >= _MAX_HELD_KEYS:
                        self._held.clear()  # a flood of distinct keys: stay bounded
                    self._held[key] = (window, block - 1)
                return None
            self._uncount(current, block - 1)  # no room for the block: count this one alone
            cur -= block - 1
        if within():
            return None
        self._uncount(current, 1)
        room = limit - 1  # the estimate must fall to this for one more request to pass
        if cur <= room and prev:
            wait = WINDOW_S - WINDOW_S * (room - cur) / prev - elapsed
        else:
            wait = WINDOW_S - elapsed + WINDOW_S - WINDOW_S * max(room, 0) / cur
        return max(1, math.ceil(wait))

    def _uncount(self, current: str, amount: int) -> None:
        """A refused request does not count: a client retrying on 429 gets through as soon
        as its accepted requests leave the window."""
        try:
            self._redis.decrby(current, amount)
        except redis.RedisError as exc:
            logger.warning("rate limit count not undone: %s", type(exc).__name__)

    def close(self) -> None:
        self._redis.close()


_touched: dict[str, float] = {}
_touched_lock = threading.Lock()


def _due_for_touch(key_id: str) -> bool:
    """True at most once a minute per key in this process (the UPDATE re-checks it)."""
    now = time.monotonic()
    with _touched_lock:
        if now - _touched.get(key_id, -math.inf) < LAST_USED_EVERY.total_seconds():
            return False
        _touched[key_id] = now
    return True


# Declares the Bearer scheme in the OpenAPI schema; the errors are ours (auto_error=False).
bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `my_...`")


def _bearer(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials.strip():
        raise AuthenticationError("an API key is required: Authorization: Bearer <key>")
    return credentials.credentials.strip()


class KeyCache:
    """The principals of recently looked-up keys, by the key's hash, for `ttl_s` seconds
    (settings.api_key_cache_s); one per app. `forget` drops a revoked key at once."""

    MAX_KEYS = 4096

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()
        # digest -> its lookup under way, and the generation it began in
        self._loading: dict[str, tuple[asyncio.Future[Principal], int]] = {}
        # Bumped by `forget`: a lookup that read the key before a revoke committed does not
        # put it back afterwards.
        self.generation = 0

    def get(self, digest: str) -> Principal | None:
        if self._ttl_s <= 0:
            return None
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[1] <= time.monotonic():
                del self._entries[digest]
                return None
            return entry[0]

    def put(self, digest: str, principal: Principal, generation: int) -> None:
        """Remember `principal`, read from the database while `generation` was current."""
        if self._ttl_s <= 0:
            return
        with self._lock:
            if generation != self.generation:
                return
            if len(self._entries) >= self.MAX_KEYS:
                self._entries.clear()  # a flood of distinct keys: start over, stay bounded
            self._entries[digest] = (principal, time.monotonic() + self._ttl_s)

    def forget(self, key_id: str) -> None:
        with self._lock:
            self.generation += 1
            for digest in [d for d, (p, _) in self._entries.items() if p.key_id == key_id]:
                del self._entries[digest]

    async def fetch(self, digest: str, load: Callable[[str], Principal]) -> Principal:
        """The key's principal: remembered, else `load(digest)` in the thread pool, once
        for all the requests that ask for the same key meanwhile (a burst after the period
        would otherwise read it once per request). Called on the event loop only."""
        if self._ttl_s <= 0:
            return await run_in_threadpool(load, digest)  # every request looks its key up
        principal = self.get(digest)
        if principal is not None:
            return principal
        # A lookup begun before a revoke (`forget`) is not shared with requests after it:
        # those look the key up again, so a revoke here still works at once.
        generation = self.generation
        loading = self._loading.get(digest)
        pending: asyncio.Future[Principal]
        if loading is None or loading[0].done() or loading[1] != generation:
            pending = asyncio.ensure_future(self._load(digest, load, generation))
            self._loading[digest] = (pending, generation)
            pending.add_done_callback(lambda done: self._loaded(digest, done))
        else:
            pending = loading[0]
        # shielded: a request that goes away does not cancel the others' lookup
        return await asyncio.shield(pending)

    async def _load(
        self, digest: str, load: Callable[[str], Principal], generation: int
    ) -> Principal:
        principal = await run_in_threadpool(load, digest)
        self.put(digest, principal, generation)
        return principal

    def _loaded(self, digest: str, done: asyncio.Future[Principal]) -> None:
        loading = self._loading.get(digest)
        if loading is not None and loading[0] is done:
            del self._loading[digest]
        _retrieved(done)


def _retrieved(done: asyncio.Future[Any]) -> None:
    """Mark a shared future's error as seen: its waiters may all have gone away."""
    if not done.cancelled():
        done.exception()


async def _lookup(settings: Settings, secret: str, cache: KeyCache) -> Principal:
    """The key's principal: from the cache without leaving the event loop, else read in
    the thread pool (as is the touch of its last_used_at, at most once a minute)."""
    principal = await cache.fetch(hash_key(secret), functools.partial(_lookup_key, settings))
    if principal.key_id is not None and _due_for_touch(principal.key_id):
        await run_in_threadpool(_touch, settings, principal.key_id)
    return principal


def _touch(settings: Settings, key_id: str) -> None:
    write = get_sessionmaker(settings.database_url)()
    try:
        touch_key(write, key_id, utcnow())
        write.commit()
    except Exception as exc:  # the request goes on; last_used_at is best effort
        logger.warning("last_used_at of key %s not updated: %s", key_id, type(exc).__name__)
    finally:
        write.rollback()
        write.close()


def _lookup_key(settings: Settings, digest: str) -> Principal:
    session = get_sessionmaker(settings.database_url, readonly=True)()
    try:
        row = session.execute(
            select(ApiKey.id, ApiKey.tenant_id, ApiKey.scopes, Tenant.requests_per_minute)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(ApiKey.hash == digest, ApiKey.revoked_at.is_(None))
        ).first()
    finally:
        session.rollback()
        session.close()
    if row is None:
        raise AuthenticationError("the API key is unknown or revoked")
    key_id, tenant_id, scopes, own_limit = row
    return Principal(
        tenant_id=tenant_id,
        key_id=key_id,
        scopes=frozenset(scopes),
        requests_per_minute=own_limit or settings.requests_per_minute,
    )


async def authenticate(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
) -> Principal:
    """The caller, from `Authorization: Bearer <key>`; 401 without a valid key. A cached
    key within a rate-limit block this process holds costs no thread hop and no round
    trip (see KeyCache and RateLimiter)."""
    settings: Settings = request.app.state.settings
    if settings.auth_disabled:
        principal = Principal(
            tenant_id=DEFAULT_TENANT,
            key_id=None,
            scopes=frozenset(SCOPES),
            requests_per_minute=settings.requests_per_minute,
        )
    else:
        principal = await _lookup(settings, _bearer(credentials), request.app.state.key_cache)
    limiter: RateLimiter = request.app.state.rate_limiter
    key = principal.key_id or "dev"
    if not limiter.take_held(key):
        wait = await limiter.count(key, principal.requests_per_minute)
        if wait is not None:
            raise RateLimitedError(
                f"more than {principal.requests_per_minute} requests per minute; retry in {wait}s",
                retry_after_s=wait,
            )
    request.state.principal = principal
    return principal


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller, who must hold `scope` (or admin); 403 otherwise."""
    if scope not in SCOPES:
        raise ValueError(scope)

    # authenticate called here, not as a sub-dependency: each level of FastAPI's
    # dependency solving costs every request a few hundredths of a millisecond
    async def check(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    ) -> Principal:
        principal = await authenticate(request, credentials)
        if not principal.allows(scope):
            raise PermissionDeniedError(f"this API key lacks the {scope!r} scope")
        return principal

    check.__name__ = f"require_{scope.replace(':', '_')}"
    return check
