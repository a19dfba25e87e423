"""The webhook sender against real HTTP servers on loopback, on SQLite and PostgreSQL: two
senders at once send each delivery once, a slow destination holds up only itself, a
redeliver during an attempt wins, and a rebinding name cannot redirect the connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from db import webhooks as webhooks_repo
from db.session import migrate, session_scope
from tests.support.harness import wait_for
from tests.support.webhooks import (
    Receiver,
    deliveries,
    later_lookups_answer,
    rebinding_resolver,
    rows,
    tenant_with_secret,
)
from workers.webhooks import WebhookSender


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(host: str = "127.0.0.1", port: int = 0) -> Receiver:
        made.append(Receiver(host, port))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture(scope="module")
def url(database_url: str) -> str:
    migrate(database_url)
    return database_url


def settings_for(url: str, tmp_path: Path, **kw: Any) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=url,
        webhook_allowed_destinations=kw.pop("allow", ["127.0.0.0/8"]),
        webhook_timeout_s=10,
        **kw,
    )


def test_two_senders_send_each_of_200_deliveries_once(
    url: str, tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    """Fault 2 of issue 16 at test size: two senders polling at once (as two leaders
    overlapping at a hand-over would), 200 deliveries, 40 of them to a slow endpoint."""
    fast, slow = receivers(), receivers()
    slow_gate = threading.Event()
    slow.gate = slow_gate
    tenant = tenant_with_secret(url)
    ids = deliveries(url, tenant, [slow.url if n % 5 == 0 else fast.url for n in range(200)])
    settings = settings_for(url, tmp_path)
    senders = [WebhookSender(settings), WebhookSender(settings)]
    stop = threading.Event()

    def poll(sender: WebhookSender) -> None:
        while not stop.is_set():
            sender.send_due()
            time.sleep(0.02)

    threads = [threading.Thread(target=poll, args=(s,)) for s in senders]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(fast.seen) >= 160, 120, "the fast deliveries")
        slow_gate.set()  # the slow endpoint answers from now on
        wait_for(
            lambda: all(r.status == "delivered" for r in rows(url, ids).values()),
            120,
            "every delivery delivered",
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
        for s in senders:
            s.wait_idle(30)
            s.close()
    received = fast.ids() + slow.ids()
    assert set(received) == set(ids)  # none lost
    assert max(received.values()) == 1, received.most_common(3)  # none sent twice
    assert {r.attempts for r in rows(url, ids).values()} == {1}


def test_a_slow_destination_holds_up_only_itself(
    url: str, tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    fast, slow = receivers(), receivers()
    slow.gate = threading.Event()
    tenant = tenant_with_secret(url)
    # the slow endpoint's deliveries are due first
    ids = deliveries(url, tenant, [slow.url] * 10 + [fast.url] * 10)
    sender = WebhookSender(settings_for(url, tmp_path, webhook_per_destination=2))
    try:
        wait_for(lambda: sender.send_due() >= 0 and len(fast.seen) == 10, 60, "fast ones")
        assert len(slow.seen) == 2  # its two slots, still waiting for answers
        slow.gate.set()
        wait_for(lambda: sender.send_due() >= 0 and len(slow.seen) == 10, 60, "the slow ones too")
        sender.wait_idle(30)
    finally:
        sender.close()
    assert {r.status for r in rows(url, ids).values()} == {"delivered"}


def test_one_poll_sends_every_due_delivery_of_a_fast_destination(
    url: str, tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    """Its two slots go on to the next due delivery as each attempt ends, instead of
    waiting for the next poll: a poll's pace (two a second) would not keep up."""
    fast = receivers()
    tenant = tenant_with_secret(url)
    ids = deliveries(url, tenant, [fast.url] * 30)
    sender = WebhookSender(settings_for(url, tmp_path, webhook_per_destination=2))
    try:
        assert sender.send_due() == 2  # one thread per slot
        assert sender.wait_idle(60)
    finally:
        sender.close()
    assert fast.ids() == dict.fromkeys(ids, 1)
    assert {r.status for r in rows(url, ids).values()} == {"delivered"}


def test_a_redeliver_during_an_attempt_wins(
    url: str, tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    slow = receivers()
    slow.gate = threading.Event()
    tenant = tenant_with_secret(url)
    (delivery_id,) = deliveries(url, tenant, [slow.url])
    sender = WebhookSender(settings_for(url, tmp_path))
    try:
        assert sender.send_due() == 1
        wait_for(lambda: len(slow.seen) == 1, 30, "the attempt in flight")
        with session_scope(url) as s:
            webhooks_repo.redeliver(s, tenant, delivery_id)
        slow.gate.set()
        sender.wait_idle(30)
        row = rows(url, [delivery_id])[delivery_id]
        # the in-flight attempt is logged but did not overwrite the redeliver
        assert (row.status, row.attempts) == ("pending", 0)
        with session_scope(url) as s:
            assert len(webhooks_repo.list_attempts(s, delivery_id)) == 1
        wait_for(lambda: sender.send_due() >= 0 and len(slow.seen) == 2, 30, "sent again")
        sender.wait_idle(30)
    finally:
        sender.close()
    row = rows(url, [delivery_id])[delivery_id]
    assert (row.status, row.attempts) == ("delivered", 1)


def test_a_rebinding_name_cannot_redirect_the_connection(
    url: str,
    tmp_path: Path,
    receivers: Callable[..., Receiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`rebind.test` answers 127.0.0.2 (allowed) to the check and 127.0.0.1 (refused: the
    "internal" service) to any later look-up. The request reaches 127.0.0.2 with the
    name in its Host header, and the internal service sees nothing."""
    internal = receivers("127.0.0.1")
    public = receivers("127.0.0.2", internal.port)
    rebinding = rebinding_resolver("127.0.0.2", "127.0.0.1")
    tenant = tenant_with_secret(url)
    target = f"http://rebind.test:{internal.port}/hook"
    (delivery_id,) = deliveries(url, tenant, [target])
    sender = WebhookSender(settings_for(url, tmp_path, allow=["127.0.0.2/32"]), rebinding)
    try:
        with later_lookups_answer("127.0.0.1"):
            assert sender.send_due() == 1
            sender.wait_idle(30)
    finally:
        sender.close()
    assert internal.seen == []
    assert public.seen == [(delivery_id, f"rebind.test:{internal.port}")]
    assert rows(url, [delivery_id])[delivery_id].status == "delivered"


def test_a_hung_dns_look_up_fails_the_attempt(url: str, tmp_path: Path) -> None:
    hang = threading.Event()

    def hung(host: str, port: int) -> list[str]:
        hang.wait(30)
        return ["127.0.0.1"]

    tenant = tenant_with_secret(url)
    (delivery_id,) = deliveries(url, tenant, ["http://slow-dns.test/hook"])
    sender = WebhookSender(settings_for(url, tmp_path, webhook_dns_timeout_s=0.3), hung)
    try:
        assert sender.send_due() == 1
        assert sender.wait_idle(20)
    finally:
        hang.set()
        sender.close()
    row = rows(url, [delivery_id])[delivery_id]
    assert row.attempts == 1 and "DNS look-up of slow-dns.test timed out" in (row.last_error or "")
