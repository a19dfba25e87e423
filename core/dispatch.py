"""Publishing job ids to the broker, shared by the API and the reconciler.

A message is published after the transaction that queued its job committed, and nothing
else is written with it: whether a job still has a message is read from the broker itself
(`messages`, core/broker_scan.py), never from bookkeeping of our own that could outlive the
message (a process dying between the two writes, a Redis that kept one of them on restart).
The reconciler republishes the due queued jobs the broker holds no message for, and takes
back a message delivered to a consumer that died before it claimed the job
(`forget_delivery`), rather than leaving it to the visibility timeout.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery

from core import cancel_notices
from core.broker_scan import BrokerMessages, BrokerScanner, Delivery
from core.enums import QUEUE_FOR_KIND, JobKind
from core.errors import ConfigurationError
from core.settings import Settings

logger = logging.getLogger(__name__)

TASK_RUN_JOB = "modelyard.run_job"
TASK_RECONCILE = "modelyard.reconcile"
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
            "visibility_timeout": settings.broker_visibility_timeout_s,
            # how often a consumer looks for messages past the visibility timeout
            "unacked_restore_interval": max(
                1.0, min(10.0, settings.broker_visibility_timeout_s / 4)
            ),
            "unacked_restore_throttle": 1,
        },
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # The reconciler runs inside the beat process (workers/app.py), not as a task: a task
        # would wait for a free worker, and when every worker is busy nobody recovers a lost one.
        "beat_schedule": {},
    }


def check_broker_timeouts(settings: Settings) -> None:
    """Refuse a worker configuration under which Redis would deliver a running job's message
    again (Celery #5935): the visibility timeout must outlast the longest job attempt."""
    visibility, limit = settings.broker_visibility_timeout_s, settings.job_time_limit_s
    if visibility <= limit:
        raise ConfigurationError(
            f"MODELYARD_BROKER_VISIBILITY_TIMEOUT_S={visibility:g} is not longer than "
            f"MODELYARD_JOB_TIME_LIMIT_S={limit:g}: Redis would deliver a running job's message "
            "to another worker while it runs. Raise the visibility timeout above the job time "
            "limit, or lower the job time limit.",
            param="broker_visibility_timeout_s",
        )


def make_celery(settings: Settings, name: str = "modelyard") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


class JobPublisher:
    """Sends `run_job(job_id)` messages and reads which jobs the broker holds messages for."""

    def __init__(self, settings: Settings, celery: Celery | None = None) -> None:
        self._celery = celery or make_celery(settings)
        self._redis: redis.Redis = redis.Redis.from_url(settings.broker_url)
        self._scanner = BrokerScanner(
            self._redis,
            set(QUEUE_FOR_KIND.values()),
            self._celery.conf.broker_transport_options or {},
            TASK_RUN_JOB,
        )

    def publish(self, job_id: str, kind: JobKind, priority: int) -> None:
        queue = QUEUE_FOR_KIND[kind]
        # The default exchange routes by queue name alone, so publishing does
        # not depend on kombu's binding keys, which a FLUSHALL also erases.
        self._celery.send_task(
            TASK_RUN_JOB,
            args=[job_id],
            queue=queue,
            exchange="",
            routing_key=queue,
            priority=PRIORITY_LEVELS - 1 - priority,
            # Flower and worker logs name the task by what it runs, not run_job.
            shadow=f"modelyard.{kind.value} {job_id}",
            # Per message, Celery would otherwise declare the queue (routing by name needs
            # no declaration; workers declare the queues they consume), set up a result
            # the result backend never keeps, and look for a parent task.
            declare=[],
            ignore_result=True,
            add_to_parent=False,
            # what Celery would write with saferepr (the message's readable args), given
            # here: saferepr was an eighth of a publish's CPU
            argsrepr=repr([job_id]),
            kwargsrepr="{}",
        )
        logger.debug("published job %s to %s", job_id, queue)

    def messages(self) -> BrokerMessages:
        """Every job message in the broker: on the job queues, or delivered and unacked."""
        return self._scanner.scan()

    def forget_delivery(self, delivery: Delivery) -> bool:
        """Drop an unacked delivery (its consumer is gone); False if it went meanwhile."""
        return self._scanner.forget(delivery)

    def notify_cancel(self, job_id: str) -> None:
        """After a cancel committed: tell a decoding worker at once (best effort; its
        heartbeat reads the database's flag anyway)."""
        try:
            cancel_notices.notify(self._redis, job_id)
        except redis.RedisError as exc:
            logger.warning("cancel notice for job %s not sent: %s", job_id, type(exc).__name__)

    def ping(self) -> bool:
        return bool(self._redis.ping())

    def close(self) -> None:
        self._redis.close()
