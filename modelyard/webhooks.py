"""Standard Webhooks signatures: what Modelyard signs its deliveries with, and
`verify_webhook` for the receiving side. Standard library only.

A delivery carries `webhook-id`, `webhook-timestamp` (Unix seconds) and
`webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` entries over
`"{id}.{timestamp}.{body}"`, keyed with the base64-decoded part of a `whsec_...`
secret. Several entries appear while a rotated-out secret is still valid.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300


class WebhookVerificationError(Exception):
    """The delivery is not authentic: missing headers, stale timestamp or bad signature."""


def new_secret() -> str:
    """A fresh signing secret: `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    return base64.b64decode(secret[len(SECRET_PREFIX) :])


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<signature>` entry for the `webhook-signature` header."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signature_headers(
    secrets_: list[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers, signed with every secret in `secrets_`."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets_),
    }


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes,
    secret: str,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Raise WebhookVerificationError unless `body` was signed with `secret` within
    `tolerance_s` of now. Pass the raw body bytes, before any JSON parsing."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        stamp = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"]
    except KeyError as exc:
        raise WebhookVerificationError(f"missing header {exc.args[0]}") from None
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance")
    expected = sign(secret, msg_id, timestamp, body)
    for entry in signatures.split():
        if hmac.compare_digest(entry, expected):
            return
    raise WebhookVerificationError("no signature matches")
