from __future__ import annotations

import logging
import threading
from datetime import timedelta

from core.enums import EventType
from core.settings import Settings
from db.events import append_event
from db.jobs import renew_lease
from db.session import session_scope
from workers.context import RunContext

logger = logging.getLogger(__name__)


class Heartbeat:
    """Renews a job's lease, stores progress and reads the cancel flag, in a thread."""

    def __init__(self, settings: Settings, ctx: RunContext, worker: str) -> None:
        self._settings = settings
        self._ctx = ctx
        self._worker = worker
        self._done = threading.Event()
        self._last_progress = -1.0
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{ctx.job_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=self._settings.heartbeat_interval_s + 5)

    def beat(self) -> None:
        ctx = self._ctx
        progress = ctx.progress
        detail = ctx.detail
        changed = progress != self._last_progress
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

    def _loop(self) -> None:
        while not self._done.wait(self._settings.heartbeat_interval_s):
            try:
                self.beat()
            except Exception:
                logger.exception("job %s: heartbeat failed", self._ctx.job_id)
            if self._ctx.stop_event.is_set():
                return
