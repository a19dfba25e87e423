"""Row 28's cause, made certain: the recovery leader frozen (cut off, paused) right after its
renewal's statement ran on the server. Had the renewal left its transaction open there,
the lease row would stay locked until the server ended that session (30 s by default),
and every other candidate's UPDATE would wait that long for the lease. Two elections of
workers/leader.py in this process, on a PostgreSQL database of their own."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

import workers.leader
from db.leader import read_lease
from db.session import migrate, session_scope
from tests.support.harness import wait_for
from tests.support.services import postgres_database
from workers.leader import MIN_TICK_S, LeaderElection

pytestmark = [pytest.mark.faults]

TTL_S = 0.6


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with postgres_database() as database_url:
        migrate(database_url)
        yield database_url


def test_a_leader_frozen_right_after_its_renewal_ran_is_replaced_within_its_lease(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    frozen = threading.Event()
    thaw = threading.Event()
    real_hold = workers.leader.hold_lease
    holds: dict[str, int] = {}

    def hold(session: Session, lease: str, holder: str, ttl_s: float) -> int | None:
        term = real_hold(session, lease, holder, ttl_s)
        holds[holder] = holds.get(holder, 0) + 1
        if holder == "frozen" and holds[holder] == 3:  # its second renewal
            frozen.set()
            thaw.wait(30)  # the process stops here, as if cut off or paused
        return term

    monkeypatch.setattr(workers.leader, "hold_lease", hold)
    first = LeaderElection(url, name, "frozen", TTL_S)
    second = LeaderElection(url, name, "second", TTL_S)
    first.start()
    try:
        wait_for(frozen.is_set, 10, "the leader frozen in its second renewal", 0.01)
        frozen_at = time.monotonic()
        second.start()
        # the frozen leader's last renewal ends its lease TTL_S after it ran; the second
        # asks every election tick (workers/leader.py), and takes it at its first ask after
        wait_for(second.is_leader, 10, "the second candidate holding the lease", 0.01)
        taken_s = time.monotonic() - frozen_at
        assert taken_s <= TTL_S + max(MIN_TICK_S, TTL_S / 3) + 0.5, taken_s
        with session_scope(url, readonly=True) as session:
            view = read_lease(session, name)
        assert view is not None and (view.holder, view.term) == ("second", 2), view
    finally:
        thaw.set()
        first.stop()
        second.stop()
