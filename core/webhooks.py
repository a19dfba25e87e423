"""Webhook rules shared by the API and the sender: which destinations may be called,
which job events become deliveries, how long to wait between attempts, and the
Standard Webhooks signatures deliveries carry (`modelyard.webhooks` re-exports those
for receivers).

A delivery carries `webhook-id`, `webhook-timestamp` (Unix seconds) and
`webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` entries over
`"{id}.{timestamp}.{body}"`, keyed with the base64-decoded part of a `whsec_...`
secret. Several entries appear while a rotated-out secret is still valid.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

from core.enums import JobStatus, WebhookEvent
from core.errors import WebhookDestinationError
from core.states import TERMINAL

Resolver = Callable[[str, int], Sequence[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_BACKOFF_S = 3600.0
JITTER = 0.2


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (IPv4 and IPv6)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _allowed(address: IPAddress, host: str, allow: Iterable[str]) -> bool:
    for entry in allow:
        if entry.lower() == host.lower():
            return True
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def _public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _public(address.ipv4_mapped)
    return address.is_global and not address.is_multicast


def check_destination(
    url: str, allow: Sequence[str] = (), resolver: Resolver = resolve
) -> list[str]:
    """The addresses `url` may be called at; raises WebhookDestinationError when it is not
    http(s), carries credentials, does not resolve, or resolves to any loopback, private,
    link-local (cloud metadata), multicast or reserved address not in `allow`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookDestinationError("webhook_url must be an http or https URL")
    if parts.username is not None or parts.password is not None:
        raise WebhookDestinationError("webhook_url must not carry credentials")
    host = parts.hostname
    if not host:
        raise WebhookDestinationError("webhook_url has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookDestinationError("webhook_url has an invalid port") from None
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(a) for a in resolver(host, port)]
        except TimeoutError:
            raise WebhookDestinationError(f"DNS look-up of {host} timed out") from None
        except (OSError, UnicodeError):
            raise WebhookDestinationError(f"webhook_url host {host} does not resolve") from None
    if not addresses:
        raise WebhookDestinationError(f"webhook_url host {host} does not resolve")
    for address in addresses:
        if not _public(address) and not _allowed(address, host, allow):
            raise WebhookDestinationError(
                f"webhook_url resolves to {address}, a non-public address; "
                "allow it in webhook_allowed_destinations to use it"
            )
    return [str(a) for a in addresses]


def event_for_status(status: str) -> WebhookEvent | None:
    """The webhook event a job status change sends, if any."""
    if status == JobStatus.RUNNING.value:
        return WebhookEvent.STARTED
    try:
        terminal = JobStatus(status) in TERMINAL
    except ValueError:
        return None
    return WebhookEvent.COMPLETED if terminal else None


def backoff_s(attempts: int, base_s: float, rng: random.Random | None = None) -> float:
    """Wait after the `attempts`-th failed attempt: base * 2**(attempts-1), at most an hour,
    +-20% jitter."""
    wait = min(base_s * 2.0 ** max(attempts - 1, 0), MAX_BACKOFF_S)
    jitter: float = (rng or random).uniform(-JITTER, JITTER)
    return wait * (1 + jitter)


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
