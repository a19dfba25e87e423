"""Sends due webhook deliveries (in the beat process, every webhook_poll_s).

Each delivery is taken with a compare-and-set before it is sent, so two senders never
send the same attempt. Redirects are not followed; the destination is checked again
before every attempt (DNS may have changed since the job was submitted).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx

from core.settings import Settings
from core.webhooks import backoff_s, check_destination, signature_headers
from db.base import utcnow
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

BATCH = 50
SENDERS = 8
USER_AGENT = "Modelyard-Webhooks/1"


class WebhookSender:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._http = httpx.Client(
            timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False
        )
        self._pool = ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="webhook")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def send_due(self) -> int:
        """Send every delivery that is due now; returns how many were attempted."""
        hold = timedelta(seconds=self._settings.webhook_timeout_s * 2 + 5)
        taken: list[tuple[WebhookDelivery, list[str]]] = []
        with session_scope(self._settings.database_url) as session:
            now = utcnow()
            for delivery in due_deliveries(session, now, BATCH):
                if take_delivery(session, delivery.id, delivery.next_attempt_at, now + hold):
                    session.expunge(delivery)
                    taken.append((delivery, signing_secrets(session, delivery.tenant_id)))
        for _ in self._pool.map(lambda pair: self._attempt(*pair), taken):
            pass
        return len(taken)

    def _attempt(self, delivery: WebhookDelivery, secrets: list[str]) -> None:
        result = self._post(delivery, secrets)
        attempts = delivery.attempts + 1
        retry_at = None
        if not result.ok and attempts < self._settings.webhook_max_attempts:
            retry_at = utcnow() + timedelta(
                seconds=backoff_s(attempts, self._settings.webhook_backoff_s)
            )
        with session_scope(self._settings.database_url) as session:
            status = record_attempt(session, delivery.id, result, retry_at=retry_at)
        logger.info(
            "webhook %s (job %s, %s) attempt %d: %s -> %s",
            delivery.id,
            delivery.job_id,
            delivery.event,
            attempts,
            result.status_code if result.status_code is not None else result.error,
            status.value,
        )

    def _post(self, delivery: WebhookDelivery, secrets: list[str]) -> AttemptResult:
        start = time.monotonic()

        def done(code: int | None, error: str | None) -> AttemptResult:
            return AttemptResult(code, error, round((time.monotonic() - start) * 1000, 1))

        if not secrets:
            return done(None, "no signing secret: create one with POST /v1/webhooks/secret")
        try:
            check_destination(delivery.url, self._settings.webhook_allowed_destinations)
        except Exception as exc:
            return done(None, f"destination refused: {getattr(exc, 'message', exc)}")
        body = json.dumps(delivery.payload, separators=(",", ":")).encode()
        headers = signature_headers(secrets, delivery.id, int(time.time()), body)
        headers["content-type"] = "application/json"
        headers["user-agent"] = USER_AGENT
        try:
            response = self._http.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return done(None, f"{type(exc).__name__}: {exc}"[:500])
        if response.is_redirect:
            return done(response.status_code, "redirect not followed")
        return done(response.status_code, None if response.is_success else response.text[:200])
