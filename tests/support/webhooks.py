"""Webhook test helpers: a receiving HTTP server, a tenant with a signing secret, and
delivery rows due now (each of its own queued job, never published)."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import select

from core.enums import DeliveryStatus, JobKind
from db import tenants as tenants_repo
from db import webhooks as webhooks_repo
from db.base import utcnow
from db.jobs import create_job
from db.models import WebhookDelivery
from db.session import session_scope


class Receiver:
    """An HTTP server on loopback that records each request's webhook-id and Host,
    answering 200; with a gate, each request waits for it first; with `delay_s`, each
    answer takes that long."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, delay_s: float = 0.0) -> None:
        self.seen: list[tuple[str, str]] = []
        self.gate: threading.Event | None = None
        self.delay_s = delay_s
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    receiver.seen.append(
                        (self.headers.get("webhook-id", ""), self.headers.get("host", ""))
                    )
                if receiver.gate is not None:
                    receiver.gate.wait(30)
                time.sleep(receiver.delay_s)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self) -> Counter[str]:
        return Counter(i for i, _ in self.seen)

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def give_secret(url: str, tenant_id: str) -> str:
    """A signing secret for `tenant_id`, so its deliveries can be sent; returns the id."""
    with session_scope(url) as s:
        webhooks_repo.rotate_secret(s, tenant_id, timedelta(0))
    return tenant_id


def tenant_with_secret(url: str) -> str:
    with session_scope(url) as s:
        tenant_id = tenants_repo.create_tenant(s, f"hooks-{uuid.uuid4().hex[:8]}").id
    return give_secret(url, tenant_id)


REBINDING_NAME = "rebind.test"


def rebinding_resolver(checked: str, later: str) -> Callable[[str, int], list[str]]:
    """A resolver for the sender in which `rebind.test` answers `checked` to its first
    look-up (the destination check) and `later` to every one after it."""
    answers = iter([[checked]])

    def resolve(host: str, port: int) -> list[str]:
        assert host == REBINDING_NAME, host
        return next(answers, [later])

    return resolve


@contextmanager
def later_lookups_answer(address: str) -> Iterator[None]:
    """While inside, every look-up of `rebind.test` through the system resolver (what an
    HTTP client would do on its own) answers `address`."""
    real = socket.getaddrinfo

    def lookup(host: Any, *args: Any, **kw: Any) -> Any:
        return real(address if host == REBINDING_NAME else host, *args, **kw)

    socket.getaddrinfo = lookup  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.getaddrinfo = real


def deliveries(url: str, tenant_id: str, urls: list[str]) -> list[str]:
    """One pending delivery per url (each of its own job), due now in this order."""
    ids: list[str] = []
    with session_scope(url) as s:
        base = utcnow() - timedelta(seconds=60)
        for n, target in enumerate(urls):
            job = create_job(
                s,
                tenant_id=tenant_id,
                kind=JobKind.NOOP,
                spec={},
                priority=0,
                max_attempts=1,
                metadata={},
            )
            row = WebhookDelivery(
                tenant_id=tenant_id,
                job_id=job.id,
                event="completed",
                url=target,
                payload={"type": "job.completed", "data": {"job_id": job.id}},
                status=DeliveryStatus.PENDING.value,
                attempts=0,
                next_attempt_at=base + timedelta(milliseconds=n),
                created_at=base,
            )
            s.add(row)
            s.flush()
            ids.append(row.id)
    return ids


def rows(url: str, ids: list[str]) -> dict[str, WebhookDelivery]:
    with session_scope(url) as s:
        found = s.scalars(select(WebhookDelivery).where(WebhookDelivery.id.in_(ids))).all()
        return {r.id: r for r in found}
