"""Webhook rules shared by the API and the sender: which destinations may be called,
which job events become deliveries, and how long to wait between attempts."""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Callable, Iterable, Sequence
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
