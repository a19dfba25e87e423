"""The plain alternative for P1: a raw Celery no-op task on the same Redis, same settings."""

from __future__ import annotations

import os

import redis
from celery import Celery

BROKER = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery("raw", broker=BROKER)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue="raw",
    worker_hijack_root_logger=False,
)
_counter = redis.Redis.from_url(BROKER)


@app.task(name="raw.noop")
def noop(index: int) -> None:
    _counter.incr("raw:done")
