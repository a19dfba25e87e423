"""Leader leases (db/leader.py) on SQLite and PostgreSQL: one holder at a time, renewed by
its holder, taken over only once expired by the database's clock, terms that grow."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import update

from db.clock import db_time_after
from db.leader import hold_lease, read_lease, release_lease
from db.models import LeaderLease
from db.session import migrate, session_scope


@pytest.fixture(scope="module")
def url(database_url: str) -> str:
    migrate(database_url)
    return database_url


def lease_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def hold(url: str, name: str, holder: str, ttl: float = 30.0) -> int | None:
    with session_scope(url) as s:
        return hold_lease(s, name, holder, ttl)


def test_first_holder_takes_it_others_wait_holder_renews(url: str) -> None:
    name = lease_name()
    assert hold(url, name, "a") == 1
    assert hold(url, name, "b") is None
    assert hold(url, name, "a") == 1  # renewing keeps the term
    with session_scope(url) as s:
        view = read_lease(s, name)
    assert view is not None and (view.holder, view.term, view.expired) == ("a", 1, False)


def test_an_expired_lease_is_taken_over_with_a_new_term(url: str) -> None:
    name = lease_name()
    assert hold(url, name, "a") == 1
    with session_scope(url) as s:  # as if a's last renewal was long ago
        s.execute(
            update(LeaderLease).where(LeaderLease.name == name).values(expires_at=db_time_after(-1))
        )
    assert hold(url, name, "b") == 2
    assert hold(url, name, "a") is None  # the old holder cannot renew what it lost
    with session_scope(url) as s:
        view = read_lease(s, name)
    assert view is not None and (view.holder, view.term) == ("b", 2)


def test_expiry_follows_the_database_clock_and_ttl(url: str) -> None:
    name = lease_name()
    assert hold(url, name, "a", ttl=0.5) == 1
    assert hold(url, name, "b", ttl=0.5) is None
    time.sleep(0.8)
    assert hold(url, name, "b", ttl=0.5) == 2


def test_release_hands_over_at_once(url: str) -> None:
    name = lease_name()
    assert hold(url, name, "a") == 1
    with session_scope(url) as s:
        assert not release_lease(s, name, "b")  # only the holder can give it up
        assert release_lease(s, name, "a")
    assert hold(url, name, "b") == 2


def test_racing_candidates_never_hold_one_term_twice(url: str) -> None:
    """Eight candidates hammer one short lease: every term has exactly one holder, and
    the terms each one won never overlap in time with another's."""
    name = lease_name()
    won: dict[int, set[str]] = {}
    lock = threading.Lock()
    stop = time.monotonic() + 3.0

    def candidate(me: str) -> None:
        while time.monotonic() < stop:
            term = hold(url, name, me, ttl=0.2)
            if term is not None:
                with lock:
                    won.setdefault(term, set()).add(me)
            time.sleep(0.05 if term is None else 0.3)  # a holder that stops renewing

    threads = [threading.Thread(target=candidate, args=(f"c{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) >= 2  # holders changed hands
    assert all(len(holders) == 1 for holders in won.values()), won
    assert sorted(won) == list(range(1, max(won) + 1))  # no term skipped or repeated
