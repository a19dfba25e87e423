"""What a runner gets to report progress and notice that it must stop."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from core.errors import JobStopped


@dataclass
class RunContext:
    job_id: str
    attempt: int
    device: str
    stop_event: threading.Event = field(default_factory=threading.Event)
    worker: str | None = None  # the lease owner; runners that write while running need it
    cancelled: bool = False
    lease_lost: bool = False
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

    def check_stop(self) -> None:
        """Raise JobStopped once the heartbeat saw a cancel or a lost lease."""
        if self.stop_event.is_set():
            reason = "cancelled" if self.cancelled else "lease lost"
            raise JobStopped(f"job {self.job_id} stopped: {reason}")
