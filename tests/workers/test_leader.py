"""The recovery lease in one process (workers/leader.py): of several candidates exactly
one runs the duties; when it stops (or dies, its lease expiring) another takes over."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import workers.leader
from db.models import LeaderLease
from db.session import migrate, session_scope
from tests.support.harness import wait_for
from workers.leader import Duty, LeaderDuties, LeaderElection


@pytest.fixture(scope="module")
def url(database_url: str) -> str:
    migrate(database_url)
    return database_url


def test_one_candidate_leads_and_another_takes_over_when_it_stops(url: str) -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    runs: Counter[str] = Counter()
    lock = threading.Lock()

    def duty_of(who: str) -> Duty:
        def run() -> None:
            with lock:
                runs[who] += 1

        return Duty("count", 0.1, run)

    candidates = {
        who: LeaderDuties(LeaderElection(url, name, who, ttl_s=0.6), [duty_of(who)])
        for who in ("a", "b", "c")
    }
    for c in candidates.values():
        c.start()
    try:
        wait_for(lambda: sum(runs.values()) >= 5, 20, "duties run")
        leaders = [w for w, c in candidates.items() if c.election.is_leader()]
        assert len(leaders) == 1, leaders
        (first,) = leaders
        assert set(runs) == {first}  # nobody else ran a duty
        candidates.pop(first).stop()  # gives the lease up
        wait_for(lambda: any(c.election.is_leader() for c in candidates.values()), 20, "takeover")
        before = dict(runs)
        time.sleep(0.5)
        (second,) = [w for w, c in candidates.items() if c.election.is_leader()]
        assert runs[second] > before.get(second, 0)
        assert runs[first] == before[first]  # the stopped one runs nothing more
    finally:
        for c in candidates.values():
            c.stop()


def test_a_renewal_leaves_no_lock_on_the_lease_row_once_its_statement_ran(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder cut off after its renewal's UPDATE ran but before it committed would keep the
    lease row locked until the server ends its session: every other candidate's UPDATE
    would wait that long (idle_in_transaction_session_timeout, far past the lease). So the
    renewal commits as the statement runs: right after it, before the election's session is
    even closed, another connection can lock the row without waiting."""
    if url.startswith("sqlite"):
        pytest.skip("SQLite is local to its host: no connection to cut")
    name = f"test-{uuid.uuid4().hex[:8]}"
    locked_after: list[bool] = []
    real_hold = workers.leader.hold_lease

    def hold_then_look(session: Session, *args: object, **kwargs: object) -> int | None:
        term = real_hold(session, *args, **kwargs)  # type: ignore[arg-type]
        with session_scope(url) as other:
            try:
                other.execute(
                    select(LeaderLease.holder)
                    .where(LeaderLease.name == name)
                    .with_for_update(nowait=True)
                ).first()
            except OperationalError:  # LockNotAvailable: the renewal's transaction is open
                locked_after.append(True)
            else:
                locked_after.append(False)
        return term

    monkeypatch.setattr(workers.leader, "hold_lease", hold_then_look)
    election = LeaderElection(url, name, "a", ttl_s=5.0)
    assert election.try_once()  # takes it
    assert election.try_once()  # renews it
    assert election.term == 1
    assert locked_after == [False, False]
