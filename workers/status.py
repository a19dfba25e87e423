"""Each worker reports what it is doing to the broker's Redis, for `modelyard workers`.

A thread in the worker's main process writes one hash per worker every heartbeat
interval: the queues it was started to consume, whether a job is running, and
when it last received a message or went idle. The hash expires when the reports
stop (the worker died, or Redis is unreachable from it). core/worker_reports.py
reads them back; workers/readiness.py turns them and the queued jobs in the
database into a verdict.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence

import redis

from core.worker_reports import status_key

logger = logging.getLogger(__name__)


class WorkerStatusReporter:
    """Writes this worker's report every `interval_s` until stopped."""

    def __init__(
        self,
        broker_url: str,
        hostname: str,
        queues: Sequence[str],
        interval_s: float,
    ) -> None:
        self._redis: redis.Redis = redis.Redis.from_url(
            broker_url, socket_timeout=5, socket_connect_timeout=5
        )
        self._hostname = hostname
        self._queues = ",".join(queues)
        self._interval = interval_s
        self._ttl_ms = int(max(3 * interval_s, 5.0) * 1000)
        self._started = time.time()
        self._last_active = self._started
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def received(self) -> None:
        """A message arrived: proof that the worker still consumes."""
        with self._lock:
            self._last_active = time.time()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=self._interval + 5)
        with contextlib.suppress(redis.RedisError):
            self._redis.delete(status_key(self._hostname))
        self._redis.close()

    def report(self) -> None:
        from celery.worker import state as worker_state

        try:
            active = list(worker_state.active_requests)
        except RuntimeError:  # the set changed while it was copied; the next copy will do
            active = list(worker_state.active_requests)
        now = time.time()
        with self._lock:
            if active:
                self._last_active = now
            last_active = self._last_active
        job = ""
        if active:
            args = getattr(active[0], "args", None) or []
            job = str(args[0]) if args else ""
        key = status_key(self._hostname)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "hostname": self._hostname,
                "pid": os.getpid(),
                "queues": self._queues,
                "busy": "1" if active else "0",
                "job": job,
                "last_active": f"{last_active:.3f}",
                "started": f"{self._started:.3f}",
                "reported": f"{now:.3f}",
            },
        )
        pipe.pexpire(key, self._ttl_ms)
        pipe.execute()

    def _loop(self) -> None:
        failing = False
        while True:
            try:
                self.report()
                if failing:
                    logger.info("worker status reports resumed")
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    logger.warning("worker status report failed: %s", type(exc).__name__)
                failing = True
            if self._done.wait(self._interval):
                return
