"""This process's lifecycle and publisher, made once and shared by the tasks and the
signal handlers of workers/app.py (which import it lazily: it never imports the app)."""

from __future__ import annotations

from functools import lru_cache

from core.dispatch import JobPublisher
from core.settings import get_settings
from workers.lifecycle import JobLifecycle
from workers.reconciler import ReconcileReport, reconcile


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
