"""Webhooks end to end: API, worker and the beat process's sender, against a local
receiver (allowed by webhook_allowed_destinations) and a listener that must stay silent."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from modelyard.webhooks import WebhookVerificationError, verify_webhook
from tests.support.harness import Stack, wait_for
from tests.support.services import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TERMINAL = ("succeeded", "failed", "cancelled", "expired")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers by path: /ok 200, /flaky-* 500 twice (per path) then 200, /redirect 302
    to /trap."""

    server: ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    box: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            rec = box["r"]
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            rec.received.append(Received(self.path, dict(self.headers.items()), body))
            if self.path.startswith("/flaky") and len(rec.at(self.path)) <= 2:
                self.send_response(500)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", f"{rec.url}/trap")
            else:
                self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box["r"] = Receiver(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield box["r"]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def hook_stack(
    database_url: str,
    broker: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("stack"),
        database_url,
        broker.url,
        webhook_allowed_destinations='["127.0.0.1/32"]',
        webhook_poll_s="0.2",
        webhook_backoff_s="0.3",
        webhook_max_attempts="4",
        webhook_progress_interval_s="0",
    )
    with s.running():
        yield s


@pytest.fixture(scope="module")
def secret(hook_stack: Stack) -> str:
    with hook_stack.client() as c:
        resp = c.post("/v1/webhooks/secret")
    assert resp.status_code == 201, resp.text
    value: str = resp.json()["secret"]
    return value


def noop(stack: Stack, url: str, **body: Any) -> dict[str, Any]:
    with stack.client() as c:
        resp = c.post(
            "/v1/jobs",
            json={"kind": "noop", "spec": {"duration_s": 0.2}, "webhook_url": url, **body},
        )
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    return job


def deliveries(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    with stack.client() as c:
        data: list[dict[str, Any]] = c.get(
            "/v1/webhooks/deliveries", params={"job_id": job_id}
        ).json()["data"]
    return data


def settled(stack: Stack, job_id: str, count: int) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        rows = deliveries(stack, job_id)
        done = [d for d in rows if d["status"] != "pending"]
        return rows if len(rows) == count and len(done) == count else None

    rows: list[dict[str, Any]] = wait_for(check, 60, f"{count} settled deliveries", 0.2)
    return rows


def test_deliveries_arrive_signed_and_verify(
    hook_stack: Stack, receiver: Receiver, secret: str
) -> None:
    job = noop(hook_stack, f"{receiver.url}/ok")
    assert hook_stack.wait_status(job["id"], TERMINAL)["status"] == "succeeded"
    rows = settled(hook_stack, job["id"], 2)
    assert {d["status"] for d in rows} == {"delivered"}
    got = [r for r in receiver.at("/ok") if json.loads(r.body)["data"]["job_id"] == job["id"]]
    assert sorted(json.loads(r.body)["type"] for r in got) == ["job.completed", "job.started"]
    for r in got:
        verify_webhook(r.headers, r.body, secret)
        assert r.headers["webhook-id"] in {d["id"] for d in rows}
        with pytest.raises(WebhookVerificationError):
            verify_webhook(r.headers, r.body + b" ", secret)


def test_failed_attempts_are_retried_with_their_codes_logged(
    hook_stack: Stack, receiver: Receiver, secret: str
) -> None:
    path = f"/flaky-{uuid.uuid4().hex}"
    job = noop(hook_stack, f"{receiver.url}{path}", webhook_events=["completed"])
    (row,) = settled(hook_stack, job["id"], 1)
    assert row["status"] == "delivered" and row["attempts"] == 3
    with hook_stack.client() as c:
        one = c.get(f"/v1/webhooks/deliveries/{row['id']}").json()
    assert [a["status_code"] for a in one["attempt_log"]] == [500, 500, 200]
    ids = {r.headers["webhook-id"] for r in receiver.at(path)}
    assert ids == {row["id"]}  # the same id on every attempt: receivers can dedupe


def test_redirects_are_not_followed(hook_stack: Stack, receiver: Receiver, secret: str) -> None:
    job = noop(hook_stack, f"{receiver.url}/redirect", webhook_events=["completed"])
    (row,) = settled(hook_stack, job["id"], 1)
    assert row["status"] == "failed" and row["attempts"] == 4
    assert row["last_status_code"] == 302 and row["last_error"] == "redirect not followed"
    assert receiver.at("/trap") == []
    with hook_stack.client() as c:
        again = c.post(f"/v1/webhooks/deliveries/{row['id']}/redeliver")
    assert again.status_code == 202
    wait_for(
        lambda: len([r for r in receiver.at("/redirect") if row["id"] in str(r.headers)]) == 5,
        30,
        "the redelivery",
        0.2,
    )


def test_a_non_allowed_listener_never_sees_a_connection(
    hook_stack: Stack, receiver: Receiver, secret: str, tmp_path: Path
) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.2", 0))  # loopback, but outside the 127.0.0.1/32 allowlist
    listener.listen(8)
    listener.settimeout(3)
    port = listener.getsockname()[1]
    try:
        for url in (f"http://127.0.0.2:{port}/", f"http://[::ffff:127.0.0.2]:{port}/"):
            with hook_stack.client() as c:
                resp = c.post("/v1/jobs", json={"kind": "noop", "spec": {}, "webhook_url": url})
            assert resp.status_code == 422, resp.text
            assert resp.json()["error"]["type"] == "invalid_webhook_url"
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
