"""This process's lifecycle and publisher, made once and shared by the tasks and the
signal handlers of workers/app.py (which import it lazily: it never imports the app)."""

from __future__ import annotations

from functools import lru_cache

from core.dispatch import JobPublisher
from core.settings import Settings, get_settings
from workers.leader import Duty
from workers.lifecycle import JobLifecycle
from workers.reconciler import ReconcileReport, RetryPublisher, reconcile
from workers.webhooks import WebhookSender


@lru_cache(maxsize=1)
def publisher() -> JobPublisher:
    return JobPublisher(get_settings())


@lru_cache(maxsize=1)
def lifecycle() -> JobLifecycle:
    from workers.device import resolve_device

    settings = get_settings()
    return JobLifecycle(settings, publisher(), resolve_device(settings.device))


def run_reconcile() -> ReconcileReport:
    return reconcile(get_settings(), publisher())


def recovery_duty_list(settings: Settings, sender: WebhookSender) -> list[Duty]:
    """What the holder of the recovery lease does, each at its own period: reconcile,
    start due webhook attempts (through `sender`), publish retries as they fall due."""
    retries = RetryPublisher(settings, publisher())
    return [
        Duty("reconcile", settings.reconcile_period_s, run_reconcile),
        Duty("webhook sender", settings.webhook_poll_s, sender.send_due),
        Duty("due retries", settings.retry_poll_s, retries.publish_due),
    ]
