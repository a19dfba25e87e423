"""Publishing job ids to the broker, shared by the API and the reconciler.

A delivery marker (a Redis key per job, in the broker's own Redis) says "a
message for this job is in the broker". It is set before a message is sent and
deleted when a worker takes the message. Losing Redis loses both together, so
the reconciler republishes exactly the queued jobs whose marker is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery

from core.enums import MAINTENANCE_QUEUE, QUEUE_FOR_KIND, JobKind
from core.settings import Settings

logger = logging.getLogger(__name__)

TASK_RUN_JOB = "modelyard.run_job"
TASK_RECONCILE = "modelyard.reconcile"
MARKER_PREFIX = "modelyard:delivery:"
PRIORITY_LEVELS = 10


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": QUEUE_FOR_KIND[JobKind.GENERATE],
        "task_create_missing_queues": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {
            "priority_steps": list(range(PRIORITY_LEVELS)),
            "queue_order_strategy": "priority",
            "sep": ":",
        },
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "beat_schedule": {
            "reconcile": {
                "task": TASK_RECONCILE,
                "schedule": settings.reconcile_period_s,
                "options": {
                    "queue": MAINTENANCE_QUEUE,
                    "exchange": "",
                    "routing_key": MAINTENANCE_QUEUE,
                    "expires": settings.reconcile_period_s,
                },
            }
        },
    }


def make_celery(settings: Settings, name: str = "modelyard") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def marker_key(job_id: str) -> str:
    return f"{MARKER_PREFIX}{job_id}"


class JobPublisher:
    """Sends `run_job(job_id)` messages and keeps the delivery markers."""

    def __init__(self, settings: Settings, celery: Celery | None = None) -> None:
        self._celery = celery or make_celery(settings)
        self._redis: redis.Redis = redis.Redis.from_url(settings.broker_url)

    def publish(self, job_id: str, kind: JobKind, priority: int) -> None:
        queue = QUEUE_FOR_KIND[kind]
        key = marker_key(job_id)
        self._redis.set(key, queue)
        try:
            # The default exchange routes by queue name alone, so publishing does
            # not depend on kombu's binding keys, which a FLUSHALL also erases.
            self._celery.send_task(
                TASK_RUN_JOB,
                args=[job_id],
                queue=queue,
                exchange="",
                routing_key=queue,
                priority=PRIORITY_LEVELS - 1 - priority,
            )
        except Exception:
            self._redis.delete(key)
            raise
        logger.debug("published job %s to %s", job_id, queue)

    def take_marker(self, job_id: str) -> None:
        self._redis.delete(marker_key(job_id))

    def missing_markers(self, job_ids: Sequence[str]) -> list[str]:
        if not job_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(marker_key(job_id))
        found = pipe.execute()
        return [job_id for job_id, n in zip(job_ids, found, strict=True) if not n]

    def ping(self) -> bool:
        return bool(self._redis.ping())

    def close(self) -> None:
        self._redis.close()
