"""Recovery with no single process needed: every worker and every beat runs for the
recovery lease, and whichever holds it reconciles, sends webhooks and publishes retries
when they fall due. When the holder dies, its lease expires by the database's clock and
another process takes over within one reconcile period.

The lease lasts half a reconcile period and is renewed every sixth of one, so a dead
leader is replaced at most two thirds of a period after its last renewal, and the new
one reconciles at once. Locally a process counts itself leader only until the lease it
last renewed would run out, measured from before it asked (monotonic clock): a leader
cut off from the database stops its duties before another can take them over. The
duties themselves are compare-and-sets, so an overlap at a hand-over is safe anyway.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from core.settings import Settings
from db.leader import hold_lease, read_lease, release_lease
from db.session import autocommit_scope, session_scope

logger = logging.getLogger(__name__)

RECOVERY_LEASE = "recovery"
MIN_TICK_S = 0.2


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class FailureLog:
    """Logs the first failure of a run of them and the success that ends it, not every
    retry in between (a database outage would otherwise log every tick)."""

    def __init__(self, what: str, retry_s: float) -> None:
        self._what = what
        self._retry_s = retry_s
        self._failing = False

    def failed(self, exc: Exception) -> None:
        if not self._failing:
            logger.warning(
                "%s failed (%s: %s); retrying every %.1fs",
                self._what,
                type(exc).__name__,
                exc,
                self._retry_s,
            )
        self._failing = True

    def worked(self) -> None:
        if self._failing:
            logger.info("%s works again", self._what)
        self._failing = False


class LeaderElection:
    """Takes and renews one named lease in a daemon thread; `is_leader()` says whether
    this process may act on it now."""

    def __init__(self, database_url: str, name: str, holder: str, ttl_s: float) -> None:
        self._url = database_url
        self.name = name
        self.holder = holder
        self._ttl = ttl_s
        self._tick = max(MIN_TICK_S, ttl_s / 3)
        self._valid_until = 0.0  # monotonic
        self.term: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease {name}", daemon=True)

    def is_leader(self) -> bool:
        return time.monotonic() < self._valid_until

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=self._tick + 5)
        if self.term is None:
            return
        self._valid_until = 0.0
        try:
            with session_scope(self._url) as session:
                release_lease(session, self.name, self.holder)
            logger.info("gave up the %s lease (term %d)", self.name, self.term)
        except Exception as exc:  # it expires by itself within its ttl
            logger.warning("could not give up the %s lease (%s)", self.name, type(exc).__name__)

    def try_once(self) -> bool:
        """One round: renew or take the lease when it is ours or free. True when held."""
        asked = time.monotonic()
        if self.term is None:
            with session_scope(self._url, readonly=True) as session:
                view = read_lease(session, self.name)
            if view is not None and not view.expired and view.holder != self.holder:
                return False
        # each statement commits as it runs: a holder cut off mid-renewal must not keep
        # the lease row locked (its successor's UPDATE would wait for the server to end the
        # cut session, far past the lease)
        with autocommit_scope(self._url) as session:
            term = hold_lease(session, self.name, self.holder, self._ttl)
        if term is None:
            self._lose("another process holds it")
            return False
        if self.term != term:
            logger.info("holding the %s lease (term %d) as %s", self.name, term, self.holder)
        self.term = term
        self._valid_until = asked + self._ttl
        return True

    def _lose(self, why: str) -> None:
        if self.term is not None:
            logger.warning("lost the %s lease (term %d): %s", self.name, self.term, why)
        self.term = None
        self._valid_until = 0.0

    def _loop(self) -> None:
        failures = FailureLog(f"{self.name} lease", self._tick)
        while not self._done.is_set():
            try:
                self.try_once()
            except Exception as exc:
                failures.failed(exc)
                if not self.is_leader():
                    self._lose("database unreachable")
            else:
                failures.worked()
            self._done.wait(self._tick)


@dataclass
class Duty:
    name: str
    period_s: float
    run_once: Callable[[], object]


class LeaderDuties:
    """Runs each duty every its period in its own thread while `election` says this
    process leads (and at once when it becomes leader). A duty's errors are logged once
    per outage; a slow duty (a webhook endpoint) delays only itself."""

    def __init__(self, election: LeaderElection, duties: list[Duty]) -> None:
        self.election = election
        self._duties = duties
        self._done = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(duty,), name=duty.name, daemon=True)
            for duty in duties
        ]

    def start(self) -> None:
        self.election.start()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        if self._done.is_set():
            return
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.election.stop()

    def _loop(self, duty: Duty) -> None:
        failures = FailureLog(duty.name, duty.period_s)
        was_leader = False
        last_run = 0.0
        poll = max(MIN_TICK_S, min(duty.period_s, 1.0))
        while not self._done.is_set():
            leader = self.election.is_leader()
            due = leader and (not was_leader or time.monotonic() - last_run >= duty.period_s)
            was_leader = leader
            if due:
                last_run = time.monotonic()
                try:
                    duty.run_once()
                except Exception as exc:
                    failures.failed(exc)
                else:
                    failures.worked()
            self._done.wait(poll)


def recovery_duties(settings: Settings, duties: list[Duty]) -> LeaderDuties:
    ttl = settings.reconcile_period_s / 2
    election = LeaderElection(settings.database_url, RECOVERY_LEASE, holder_name(), ttl)
    return LeaderDuties(election, duties)
