from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import redis

from core.enums import EventType
from core.settings import Settings
from db.events import append_event
from db.jobs import renew_lease
from db.session import DATABASE_UNAVAILABLE, session_scope
from workers.context import RunContext, track, untrack
from workers.leases import BrokerLeases, broker_leases

logger = logging.getLogger(__name__)


class Heartbeat:
    """Renews a job's leases, stores progress, reads the cancel flag and enforces the run
    time limit, in a thread, until stopped.

    Two leases: the database one (authoritative) and a Redis one (workers/leases.py) that
    tells the reconciler the worker is alive while the database is unreachable. A worker
    that can renew neither for a lease TTL stops the job itself (it must assume another
    worker may take it over)."""

    def __init__(
        self,
        settings: Settings,
        ctx: RunContext,
        worker: str,
        leases: BrokerLeases | None = None,
    ) -> None:
        self._settings = settings
        self._ctx = ctx
        self._worker = worker
        self._leases = leases if leases is not None else broker_leases(settings.broker_url)
        self._done = threading.Event()
        self._last_progress = -1.0
        self._last_renewed = time.monotonic()
        self._db_down = False
        self._broker_down = False
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{ctx.job_id}", daemon=True
        )

    def start(self) -> None:
        track(self._ctx)
        self._renew_broker_lease()
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=self._settings.heartbeat_interval_s + 5)
        untrack(self._ctx)

    def _renew_broker_lease(self) -> bool:
        try:
            self._leases.renew(self._ctx.job_id, self._worker, self._settings.lease_ttl_s)
        except redis.RedisError as exc:
            if not self._broker_down:
                logger.warning(
                    "job %s: broker lease not renewed (%s)", self._ctx.job_id, type(exc).__name__
                )
            self._broker_down = True
            return False
        self._broker_down = False
        return True

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
                    self._worker,
                    timedelta(seconds=self._settings.lease_ttl_s),
                    progress if changed else None,
                    detail if changed else None,
                )
                if state.held and changed:
                    append_event(
                        session,
                        ctx.job_id,
                        EventType.PROGRESS,
                        "",
                        {"progress": round(progress, 4), **detail},
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
            logger.warning("job %s: lease lost by %s, stopping", ctx.job_id, self._worker)
            ctx.lease_lost = True
            ctx.stop_event.set()
        elif state.cancel_requested and not ctx.cancelled:
            logger.info("job %s: cancel requested, stopping", ctx.job_id)
            ctx.cancelled = True
            ctx.stop_event.set()
        return True

    def beat(self) -> None:
        ctx = self._ctx
        in_broker = self._renew_broker_lease()
        in_database = self._renew_database_lease()
        now = time.monotonic()
        if in_broker or in_database:
            self._last_renewed = now
        elif now - self._last_renewed > self._settings.lease_ttl_s and not ctx.lease_lost:
            logger.error(
                "job %s: neither lease renewed for %.0fs; stopping (another worker may take it)",
                ctx.job_id,
                now - self._last_renewed,
            )
            ctx.lease_lost = True
            ctx.stop_event.set()
        if ctx.deadline is not None and now >= ctx.deadline and not ctx.timed_out:
            logger.info("job %s: run time limit reached, stopping", ctx.job_id)
            ctx.timed_out = True
            ctx.stop_event.set()

    def _loop(self) -> None:
        while not self._done.wait(self._settings.heartbeat_interval_s):
            try:
                self.beat()
            except Exception:
                logger.exception("job %s: heartbeat failed", self._ctx.job_id)
            if self._ctx.lease_lost:
                return
