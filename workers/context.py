"""What a runner gets to report progress and notice that it must stop."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from core.errors import JobStopped


def worker_identity() -> str:
    """This process's name as a lease owner (host:pid; it repeats across container
    restarts, so fencing uses the attempt number, never this)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class RunContext:
    job_id: str
    attempt: int
    device: str
    # The job's tenant: datasets, registered models and checkpoints it names resolve only
    # within it. None (tests of runners alone): any tenant.
    tenant_id: str | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    worker: str | None = None  # the lease owner; runners that write while running need it
    deadline: float | None = None  # time.monotonic() at which the attempt must stop (timed_out)
    max_runtime_s: float | None = None  # the run time limit behind `deadline`, for messages
    # time.monotonic() just before the claim's transaction began: the database lease it took
    # cannot run out sooner than a lease TTL after this (the heartbeat counts from it)
    leased_at: float | None = None
    cancelled: bool = False
    paused: bool = False  # a pause was asked: checkpoint, stop and rest as `paused`
    lease_lost: bool = False
    timed_out: bool = False
    given_back: bool = False  # the worker is shutting down: stop and hand the job back
    _progress: float = 0.0
    _detail: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def report_progress(self, fraction: float, **detail: Any) -> None:
        """Fraction done, plus optional JSON-able detail (step, total_steps, eta_s, loss)."""
        with self._lock:
            self._progress = min(max(fraction, 0.0), 1.0)
            if detail:
                self._detail = dict(detail)

    @property
    def progress(self) -> float:
        with self._lock:
            return self._progress

    @property
    def detail(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._detail)

    @property
    def stop_reason(self) -> str:
        if self.lease_lost:
            return "lease lost"
        if self.cancelled:
            return "cancelled"
        if self.timed_out:
            return "timed out"
        if self.paused:
            return "paused"
        if self.given_back:
            return "worker shutting down"
        return "stopped"

    def check_stop(self) -> None:
        """Raise JobStopped once the job must stop: cancel, pause, lost lease, run time
        limit or worker shutdown."""
        if self.stop_event.is_set():
            raise JobStopped(f"job {self.job_id} stopped: {self.stop_reason}")


_running: dict[str, RunContext] = {}
# re-entrant: the shutdown signal handler runs on the main thread, which may hold it
_running_lock = threading.RLock()


def track(ctx: RunContext) -> None:
    """Note a job running in this process (done by its heartbeat)."""
    with _running_lock:
        _running[ctx.job_id] = ctx


def untrack(ctx: RunContext) -> None:
    with _running_lock:
        if _running.get(ctx.job_id) is ctx:
            del _running[ctx.job_id]


def give_back_running() -> list[str]:
    """Ask every job running in this process to stop and be handed back (worker shutdown).
    Safe to call from a signal handler: it only sets flags and events."""
    with _running_lock:
        running = list(_running.values())
    for ctx in running:
        ctx.given_back = True
        ctx.stop_event.set()
    return [ctx.job_id for ctx in running]
