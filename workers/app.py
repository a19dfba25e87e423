"""The Celery app. Importing it loads no model and no torch."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from core.dispatch import check_broker_timeouts, make_celery
from core.errors import ConfigurationError
from core.heap import freeze_startup_objects
from core.logs import configure_logging
from core.settings import get_settings

logger = logging.getLogger(__name__)

celery_app = make_celery(get_settings())
celery_app.conf.include = ["workers.tasks"]
celery_app.conf.worker_consumer = "workers.consumer:PromptReconnectConsumer"

_status: Any = None  # this worker's WorkerStatusReporter, once it is ready
_recovery: Any = None  # this process's LeaderDuties (reconciler, webhooks, due retries)


@signals.setup_logging.connect
def _logging(**_: Any) -> None:
    """Celery's own log lines go through our handler (text or JSON, with the job id)."""
    configure_logging(get_settings())


@signals.worker_init.connect
def _refuse_unsafe_timeouts(**_: Any) -> None:
    try:
        check_broker_timeouts(get_settings())
    except ConfigurationError as exc:
        logger.critical("refusing to start: %s", exc.message)
        raise SystemExit(2) from exc


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    from workers import runtime
    from workers.status import WorkerStatusReporter

    global _status
    settings = get_settings()
    queues = sorted(q.name for q in getattr(sender.task_consumer, "queues", []))
    _status = WorkerStatusReporter(
        settings.broker_url, str(sender.hostname), queues, settings.heartbeat_interval_s
    )
    _status.start()
    runtime.lifecycle()  # imports torch now, not when the first job (or a recovery) arrives
    try:
        runtime.run_reconcile()
    except Exception:
        logger.exception("reconcile at worker start failed")
    freeze_startup_objects("worker")  # torch and the rest, out of every full collection
    if settings.recovery_in_workers:
        _start_recovery()


@signals.task_received.connect
def _on_received(**_: Any) -> None:
    if _status is not None:
        _status.received()


@signals.worker_shutting_down.connect
def _give_back_jobs(**_: Any) -> None:
    """SIGTERM (warm shutdown): jobs running in this process stop at their next step,
    checkpoint, and are handed back for another worker instead of running to the end."""
    from workers.context import give_back_running

    give_back_running()


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if _status is not None:
        _status.stop()
    if _recovery is not None:
        _recovery.stop()  # gives the lease up, so another process takes over at once


@signals.beat_init.connect
def _on_beat_init(**_: Any) -> None:
    _start_recovery()


def _start_recovery() -> None:
    """Run for the recovery lease; while held, reconcile, send webhooks and publish due
    retries (workers/leader.py). Every worker and every beat does this: any one of them
    can die without recovery stopping."""
    import atexit

    from workers import runtime
    from workers.leader import recovery_duties
    from workers.webhooks import WebhookSender

    global _recovery
    if _recovery is not None:
        return
    settings = get_settings()
    duties = runtime.recovery_duty_list(settings, WebhookSender(settings))
    _recovery = recovery_duties(settings, duties)
    _recovery.start()
    atexit.register(_recovery.stop)
    logger.info(
        "running for the recovery lease (reconcile every %.1fs) as %s",
        settings.reconcile_period_s,
        _recovery.election.holder,
    )
