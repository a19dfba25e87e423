"""Sends due webhook deliveries (in the recovery leader, every webhook_poll_s).

Each attempt takes its delivery with a compare-and-set and a fresh take token just
before sending, and records its result only while it still holds that token: two senders
never send one delivery's attempt twice, and a redeliver asked during an attempt wins.
Due deliveries wait in a backlog per destination; pool threads work through them with at
most `webhook_per_destination` threads per destination, each going on to the next due
delivery as soon as an attempt ends, and `send_due` never waits for them, so one slow
endpoint holds up only its own deliveries and a fast one is not held to a poll's pace.

The destination is checked before every attempt (DNS may have changed since the job was
submitted), with a time limit on the look-up, and the connection goes to the address that
was checked (Host header and TLS server name kept): a name that answers differently the
second time (DNS rebinding) cannot redirect it. Redirects are not followed.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlsplit, urlunsplit

import httpx

from core.settings import Settings
from core.webhooks import Resolver, backoff_s, check_destination, resolve, signature_headers
from db.models import WebhookDelivery
from db.session import session_scope
from db.webhooks import (
    AttemptResult,
    due_deliveries,
    record_attempt,
    signing_secrets,
    take_delivery,
)

logger = logging.getLogger(__name__)

BATCH = 200
SENDERS = 8
USER_AGENT = "Modelyard-Webhooks/1"


def destination(url: str) -> str:
    """What per-destination slots are counted by: scheme, host and port."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port or ''}"


def pinned_url(url: str, address: str) -> str:
    """`url` with its host replaced by the checked `address` (port and path kept)."""
    parts = urlsplit(url)
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class WebhookSender:
    def __init__(self, settings: Settings, resolver: Resolver = resolve) -> None:
        self._settings = settings
        self._resolver = resolver
        self._http = httpx.Client(
            timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False
        )
        self._pool = ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="webhook")
        self._dns = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-dns")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        # deliveries read as due and not yet finished, per destination: waiting in its
        # backlog or in an attempt; and how many pool threads work each destination
        self._backlog: dict[str, deque[WebhookDelivery]] = {}
        self._taken: set[str] = set()
        self._per_destination: dict[str, int] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._dns.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    @property
    def hold_s(self) -> float:
        """How long an attempt holds its delivery: its look-up, then connect, write and
        read each within the timeout, and a margin."""
        return self._settings.webhook_dns_timeout_s + 3 * self._settings.webhook_timeout_s + 5

    def send_due(self) -> int:
        """Queue each due delivery on its destination's backlog and start pool threads for
        destinations with a free slot, without waiting for any; returns how many threads
        were started. A thread goes on with its destination's backlog (then another's)
        until none is left, so a fast endpoint is not held to one poll's worth of slots."""
        with session_scope(self._settings.database_url, readonly=True) as session:
            due = list(due_deliveries(session, BATCH))
        with self._lock:
            for delivery in due:
                if delivery.id not in self._taken:
                    self._taken.add(delivery.id)
                    self._backlog.setdefault(destination(delivery.url), deque()).append(delivery)
            started = 0
            while (
                sum(self._per_destination.values()) < SENDERS
                and (where := self._free_destination()) is not None
            ):
                self._per_destination[where] = self._per_destination.get(where, 0) + 1
                self._pool.submit(self._work, where, self._backlog[where].popleft())
                started += 1
        return started

    def wait_idle(self, timeout: float) -> bool:
        """Until no delivery is waiting or in an attempt (tests, shutdown); False when
        `timeout` passed."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._taken, timeout)

    def _free_destination(self) -> str | None:
        """A destination with deliveries waiting and fewer threads than its slots (under
        the lock)."""
        limit = self._settings.webhook_per_destination
        for where, backlog in self._backlog.items():
            if backlog and self._per_destination.get(where, 0) < limit:
                return where
        return None

    def _next(self, where: str) -> tuple[str, WebhookDelivery] | None:
        """The next delivery for a thread working `where`: from its backlog, or else from
        another destination with a free slot (the thread moves there); None: it stops."""
        with self._lock:
            backlog = self._backlog.get(where)
            if not backlog:
                self._backlog.pop(where, None)
                self._per_destination[where] -= 1
                if not self._per_destination[where]:
                    del self._per_destination[where]
                moved = self._free_destination()
                if moved is None:
                    return None
                where = moved
                self._per_destination[where] = self._per_destination.get(where, 0) + 1
            return where, self._backlog[where].popleft()

    def _work(self, where: str, delivery: WebhookDelivery) -> None:
        taken: tuple[str, WebhookDelivery] | None = (where, delivery)
        while taken is not None:
            where, delivery = taken
            try:
                self._attempt(delivery)
            except Exception:
                logger.exception("webhook %s: attempt failed unexpectedly", delivery.id)
            finally:
                with self._idle:
                    self._taken.discard(delivery.id)
                    self._idle.notify_all()
            taken = self._next(where)

    def _attempt(self, delivery: WebhookDelivery) -> None:
        with session_scope(self._settings.database_url) as session:
            token = take_delivery(session, delivery.id, delivery.next_attempt_at, self.hold_s)
            if token is None:
                return  # another sender took it, or it was redelivered, since it was read
            secrets = signing_secrets(session, delivery.tenant_id)
        result = self._post(delivery, secrets)
        attempts = delivery.attempts + 1
        retry_in_s = None
        if not result.ok and attempts < self._settings.webhook_max_attempts:
            retry_in_s = backoff_s(attempts, self._settings.webhook_backoff_s)
        with session_scope(self._settings.database_url) as session:
            status = record_attempt(session, delivery.id, token, result, retry_in_s=retry_in_s)
        logger.info(
            "webhook %s (job %s, %s) attempt %d: %s -> %s",
            delivery.id,
            delivery.job_id,
            delivery.event,
            attempts,
            result.status_code if result.status_code is not None else result.error,
            "superseded (redelivered or taken over)" if status is None else status.value,
        )

    def _resolve(self, host: str, port: int) -> list[str]:
        future = self._dns.submit(self._resolver, host, port)
        try:
            return list(future.result(timeout=self._settings.webhook_dns_timeout_s))
        except FutureTimeout:
            raise TimeoutError(f"DNS look-up of {host} timed out") from None

    def _post(self, delivery: WebhookDelivery, secrets: list[str]) -> AttemptResult:
        start = time.monotonic()

        def done(code: int | None, error: str | None) -> AttemptResult:
            return AttemptResult(code, error, round((time.monotonic() - start) * 1000, 1))

        if not secrets:
            return done(None, "no signing secret: create one with POST /v1/webhooks/secret")
        try:
            addresses = check_destination(
                delivery.url, self._settings.webhook_allowed_destinations, self._resolve
            )
        except Exception as exc:
            return done(None, f"destination refused: {getattr(exc, 'message', exc)}")
        parts = urlsplit(delivery.url)
        body = json.dumps(delivery.payload, separators=(",", ":")).encode()
        headers = signature_headers(secrets, delivery.id, int(time.time()), body)
        headers["content-type"] = "application/json"
        headers["user-agent"] = USER_AGENT
        headers["host"] = parts.netloc
        extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
        try:
            response = self._http.post(
                pinned_url(delivery.url, addresses[0]),
                content=body,
                headers=headers,
                extensions=extensions,
            )
        except httpx.HTTPError as exc:
            return done(None, f"{type(exc).__name__}: {exc}"[:500])
        if response.is_redirect:
            return done(response.status_code, "redirect not followed")
        return done(response.status_code, None if response.is_success else response.text[:200])
