"""The recovery lease in one process (workers/leader.py): of several candidates exactly
one runs the duties; when it stops (or dies, its lease expiring) another takes over."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest

from db.session import migrate
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
