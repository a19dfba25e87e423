"""What a runner gets to report progress and notice that it must stop."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from core.errors import JobStopped


@dataclass
class RunContext:
    job_id: str
    attempt: int
    device: str
    stop_event: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    lease_lost: bool = False
    _progress: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def report_progress(self, fraction: float) -> None:
        with self._lock:
            self._progress = min(max(fraction, 0.0), 1.0)

    @property
    def progress(self) -> float:
        with self._lock:
            return self._progress

    def check_stop(self) -> None:
        """Raise JobStopped once the heartbeat saw a cancel or a lost lease."""
        if self.stop_event.is_set():
            reason = "cancelled" if self.cancelled else "lease lost"
            raise JobStopped(f"job {self.job_id} stopped: {reason}")
