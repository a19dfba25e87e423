from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import redis

from core.enums import EventType, WebhookEvent
from core.settings import Settings
from db.events import append_event
from db.jobs import renew_lease
from db.session import DATABASE_UNAVAILABLE, session_scope
from db.webhooks import queue_delivery
from workers.context import RunContext, track, untrack
from workers.leases import BrokerLeases, broker_leases

logger = logging.getLogger(__name__)

# The heartbeat renewing each job of this process; a newer one for the same job takes over.
_active: dict[str, Heartbeat] = {}
_active_lock = threading.Lock()


class _LeaseWatchdog:
    """One thread per process that runs every active heartbeat's checks (`Heartbeat.check`)
    several times per heartbeat interval; the first check after an attempt has run for a
    check period starts its renewing threads. The renewing threads block for as long as the
    database or Redis takes to answer (up to a connect timeout when a host is cut off), so
    a check that waited for them could come after the lease ran out and another worker
    took the job; this thread never waits on the network."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # how long its current wait lasts (set under `_active_lock`): the shortest check
        # period of the heartbeats it found, or with none the period it last used, so that
        # between short jobs it keeps looking on a timer and the next one needs no wake;
        # None (an untimed wait) only before the process's first heartbeat
        self._waiting_s: float | None = None

    def watch(self, check_every_s: float) -> None:
        """Make sure the thread runs (called after a heartbeat that is checked every
        `check_every_s` joined `_active`). It is woken only when it would look too late:
        from its untimed wait (before the first heartbeat), or a timed one longer than the
        new heartbeat's period (a wake per attempt cost a thread switch per short job)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="lease-watchdog", daemon=True
                )
                self._thread.start()
        with _active_lock:
            waiting_s = self._waiting_s
        if waiting_s is None or waiting_s > check_every_s:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.clear()
            with _active_lock:
                beats = list(_active.values())
                self._waiting_s = min((b.check_every_s for b in beats), default=self._waiting_s)
            if self._waiting_s is None:
                self._wake.wait()
                continue
            now = time.monotonic()
            for beat in beats:
                try:
                    beat.check(now)
                except Exception:
                    logger.exception("job %s: lease check failed", beat.job_id)
            # An event's wait, not time.sleep: a new heartbeat wakes it when it must, and its
            # timed wait is the one the renewing threads use (Python's sleep is an absolute
            # clock_nanosleep, which a faked wall clock, as libfaketime's, can stretch).
            self._wake.wait(self._waiting_s)


_watchdog = _LeaseWatchdog()


class Heartbeat:
    """Renews a job's leases, stores progress, reads the cancel flag and enforces the run
    time limit, in a thread, until stopped.

    Two leases: the database one (authoritative) and a Redis one (workers/leases.py) that
    tells the reconciler the worker is alive while the database is unreachable or slow.
    Each is renewed by its own thread, so a database write that waits (an outage, a busy
    SQLite file) never holds up the broker lease. A worker that can renew neither for a
    lease TTL stops the job itself (it must assume another worker may take it over).

    Both leases are held for the attempt (the fencing token): a renewal of an attempt that
    is no longer the job's live one fails, and the runner is told to stop. A runner that
    has not stopped `stop_grace_s` after its run time limit or its lost lease is overdue:
    `on_overdue` is called once (the lifecycle records the outcome and restarts the worker
    process, see workers/lifecycle.py).

    Renewals are counted from when they were sent, and the claim's lease from just before
    the claim: neither lease can run out sooner than a TTL after that. A worker that has
    renewed neither for a TTL less two heartbeat intervals tells its runner to stop, so
    the stop is asked before the reconciler may hand the job to another worker (a host
    cut off from the network); the process's lease watchdog runs that check, not the
    renewing threads, which may be stuck waiting on the network."""

    def __init__(
        self,
        settings: Settings,
        ctx: RunContext,
        worker: str,
        leases: BrokerLeases | None = None,
        on_overdue: Callable[[RunContext], None] | None = None,
    ) -> None:
        self._settings = settings
        self._ctx = ctx
        self._worker = worker
        self._leases = leases if leases is not None else broker_leases(settings.broker_url)
        self._on_overdue = on_overdue
        self._stop_asked: float | None = None  # when the limit was reached or the lease lost
        self._overdue_called = False
        self._done = threading.Event()
        self._last_progress = -1.0
        leased_at = ctx.leased_at if ctx.leased_at is not None else time.monotonic()
        self._broker_renewed = self._db_renewed = leased_at
        self._db_down = False
        self._broker_down = False
        self._broker_lease_taken = False
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{ctx.job_id}", daemon=True
        )
        self._broker_thread = threading.Thread(
            target=self._broker_loop, name=f"broker-lease-{ctx.job_id}", daemon=True
        )
        self._threads_lock = threading.Lock()
        self._threads_started = False  # or never to be: stopped before they were due
        self._started_at = leased_at
        self._first_wait = settings.heartbeat_interval_s

    def start(self) -> None:
        """Start renewing; a heartbeat already renewing this job (the executor's, while a
        generation batch loads its model) hands over to this one."""
        job_id = self._ctx.job_id
        with _active_lock:
            previous = _active.get(job_id)
            _active[job_id] = self
        if previous is not None and previous is not self:
            previous._done.set()
        track(self._ctx)
        # The renewing threads are started by the lease watchdog once the attempt has run
        # for `check_every_s` (see `_start_renewing`): a job that ends sooner starts none.
        # Both leases are first renewed one interval in: until then the claim's database
        # lease (a full TTL) covers the attempt, and a job that ends sooner costs Redis
        # nothing.
        self._started_at = time.monotonic()
        _watchdog.watch(self.check_every_s)

    def _start_renewing(self, now: float) -> None:
        """Start the two renewing threads, each first renewing one heartbeat interval after
        `start`; nothing once stopped (or started)."""
        with self._threads_lock:
            if self._threads_started or self._done.is_set():
                return
            self._threads_started = True
            elapsed = now - self._started_at
            self._first_wait = max(0.0, self._settings.heartbeat_interval_s - elapsed)
            self._thread.start()
            self._broker_thread.start()

    def stop(self) -> None:
        self._done.set()
        with self._threads_lock:
            self._threads_started = True  # the watchdog starts none after this
        for thread in (self._thread, self._broker_thread):
            if thread.is_alive():
                thread.join(timeout=self._settings.heartbeat_interval_s + 5)
        with _active_lock:
            current = _active.get(self._ctx.job_id) is self
            if current:
                del _active[self._ctx.job_id]
        if current:
            untrack(self._ctx)

    @property
    def job_id(self) -> str:
        return self._ctx.job_id

    @property
    def check_every_s(self) -> float:
        """How often the watchdog runs `check`: a quarter of the heartbeat interval."""
        return min(max(self._settings.heartbeat_interval_s / 4, 0.02), 1.0)

    @property
    def silence_limit_s(self) -> float:
        """How long neither lease may go unrenewed before the runner is told to stop: a TTL
        less two heartbeat intervals (room for the watchdog's own delay on a loaded
        machine), and at most half a TTL early when the interval is long next to the TTL."""
        ttl = self._settings.lease_ttl_s
        return max(ttl - 2 * self._settings.heartbeat_interval_s, ttl / 2)

    @property
    def broker_lease_taken(self) -> bool:
        """Whether this heartbeat has set the attempt's broker lease (read after `stop`)."""
        return self._broker_lease_taken

    def _renew_broker_lease(self) -> bool:
        ctx = self._ctx
        sent = time.monotonic()
        try:
            held = self._leases.renew(
                ctx.job_id, self._worker, ctx.attempt, self._settings.lease_ttl_s
            )
        except redis.RedisError as exc:
            if not self._broker_down:
                logger.warning(
                    "job %s: broker lease not renewed (%s)", self._ctx.job_id, type(exc).__name__
                )
            self._broker_down = True
            return False
        self._broker_down = False
        if not held:
            logger.warning(
                "job %s: a newer attempt than %d holds the broker lease, stopping",
                ctx.job_id,
                ctx.attempt,
            )
            self._lose_lease()
            return False
        self._broker_renewed = sent
        self._broker_lease_taken = True
        return True

    def _lose_lease(self) -> None:
        ctx = self._ctx
        if not ctx.lease_lost:
            ctx.lease_lost = True
            ctx.stop_event.set()
        if self._stop_asked is None:
            self._stop_asked = time.monotonic()

    def _broker_loop(self) -> None:
        wait = self._first_wait
        while not self._done.wait(wait):
            wait = self._settings.heartbeat_interval_s
            if self._ctx.lease_lost:
                return
            self._renew_broker_lease()

    def _renew_database_lease(self) -> bool:
        ctx = self._ctx
        progress = ctx.progress
        detail = ctx.detail
        changed = progress != self._last_progress
        try:
            with session_scope(self._settings.database_url) as session:
                state = renew_lease(
                    session,
                    ctx.job_id,
                    ctx.attempt,
                    timedelta(seconds=self._settings.lease_ttl_s),
                    progress if changed else None,
                    detail if changed else None,
                )
                if state.held and changed:
                    data = {"progress": round(progress, 4), **detail}
                    append_event(session, ctx.job_id, EventType.PROGRESS, "", data)
                    queue_delivery(
                        session,
                        ctx.job_id,
                        WebhookEvent.PROGRESS,
                        data,
                        throttle_s=self._settings.webhook_progress_interval_s,
                    )
        except DATABASE_UNAVAILABLE as exc:
            if not self._db_down:
                logger.warning(
                    "job %s: database unreachable (%s); the job goes on, its lease is kept "
                    "in the broker",
                    ctx.job_id,
                    type(exc).__name__,
                )
            self._db_down = True
            return False
        if self._db_down:
            logger.info("job %s: database reachable again; lease renewed", ctx.job_id)
            self._db_down = False
        if changed:
            self._last_progress = progress
        if not state.held:
            logger.warning(
                "job %s: attempt %d of %s lost its lease (compare-and-set on the attempt "
                "failed), stopping",
                ctx.job_id,
                ctx.attempt,
                self._worker,
            )
            self._lose_lease()
        elif state.cancel_requested and not ctx.cancelled:
            logger.info("job %s: cancel requested, stopping", ctx.job_id)
            ctx.cancelled = True
            ctx.stop_event.set()
        elif state.pause_requested and not ctx.paused:
            logger.info("job %s: pause requested, checkpointing and stopping", ctx.job_id)
            ctx.paused = True
            ctx.stop_event.set()
        return True

    def beat(self) -> None:
        """One database renewal (the broker lease has its own thread; the lease watchdog
        runs the checks)."""
        sent = time.monotonic()
        if not self._ctx.lease_lost and self._renew_database_lease():
            self._db_renewed = sent

    def check(self, now: float) -> None:
        """Stop the runner when neither lease was renewed for `silence_limit_s` or the run
        time limit is reached; call `on_overdue` once a stopped runner is overdue."""
        ctx = self._ctx
        if self._done.is_set():
            return
        if not self._threads_started and now - self._started_at >= self.check_every_s:
            self._start_renewing(now)
        silent = now - max(self._db_renewed, self._broker_renewed)
        if silent >= self.silence_limit_s and not ctx.lease_lost:
            logger.error(
                "job %s: neither lease renewed for %.1fs; stopping before it can run out "
                "(another worker may take it)",
                ctx.job_id,
                silent,
            )
            self._lose_lease()
        if ctx.deadline is not None and now >= ctx.deadline and not ctx.timed_out:
            logger.info("job %s: run time limit reached, stopping", ctx.job_id)
            ctx.timed_out = True
            ctx.stop_event.set()
        self._check_overdue(now)

    def _check_overdue(self, now: float) -> None:
        if self._stop_asked is None and (self._ctx.lease_lost or self._ctx.timed_out):
            self._stop_asked = now  # a write the fence refused marked the lease lost
        asked = self._stop_asked
        if asked is None or self._overdue_called or self._on_overdue is None:
            return
        if now - asked < self._settings.stop_grace_s:
            return
        self._overdue_called = True
        logger.error(
            "job %s: attempt %d has not stopped %.0fs after it was told to (%s)",
            self._ctx.job_id,
            self._ctx.attempt,
            now - asked,
            self._ctx.stop_reason,
        )
        self._on_overdue(self._ctx)

    def _loop(self) -> None:
        wait = self._first_wait
        while not self._done.wait(wait):
            wait = self._settings.heartbeat_interval_s
            try:
                self.beat()
            except Exception:
                logger.exception("job %s: heartbeat failed", self._ctx.job_id)
