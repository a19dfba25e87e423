"""The Celery app. Importing it loads no model and no torch."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from core.dispatch import check_broker_timeouts, make_celery
from core.errors import ConfigurationError
from core.logs import configure_logging
from core.settings import get_settings

logger = logging.getLogger(__name__)

celery_app = make_celery(get_settings())
celery_app.conf.include = ["workers.tasks"]
celery_app.conf.worker_consumer = "workers.consumer:PromptReconnectConsumer"

_status: Any = None  # this worker's WorkerStatusReporter, once it is ready
_reconciler: Any = None  # the beat process's ReconcileLoop
_webhooks: Any = None  # the beat process's webhook sender loop


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
    from workers.status import WorkerStatusReporter
    from workers.tasks import prepare_lifecycle, run_reconcile

    global _status
    settings = get_settings()
    queues = sorted(q.name for q in getattr(sender.task_consumer, "queues", []))
    _status = WorkerStatusReporter(
        settings.broker_url, str(sender.hostname), queues, settings.heartbeat_interval_s
    )
    _status.start()
    prepare_lifecycle()  # imports torch now, not when the first job (or a recovery) arrives
    try:
        run_reconcile()
    except Exception:
        logger.exception("reconcile at worker start failed")


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


@signals.beat_init.connect
def _start_reconciler(**_: Any) -> None:
    from workers.reconciler import ReconcileLoop
    from workers.tasks import run_reconcile

    global _reconciler
    _reconciler = ReconcileLoop(get_settings().reconcile_period_s, run_reconcile)
    _reconciler.start()
    logger.info("reconciler running every %.1fs", get_settings().reconcile_period_s)
    _start_webhook_sender()


def _start_webhook_sender() -> None:
    from workers.reconciler import ReconcileLoop
    from workers.webhooks import WebhookSender

    global _webhooks
    settings = get_settings()
    sender = WebhookSender(settings)
    _webhooks = ReconcileLoop(settings.webhook_poll_s, sender.send_due, name="webhook sender")
    _webhooks.start()
