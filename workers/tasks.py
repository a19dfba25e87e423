"""Thin Celery tasks: they take a job id and hand it to the lifecycle."""

from __future__ import annotations

from functools import lru_cache

from core.dispatch import TASK_RECONCILE, TASK_RUN_JOB, JobPublisher
from core.settings import get_settings
from workers.app import celery_app
from workers.lifecycle import JobLifecycle
from workers.reconciler import ReconcileReport, reconcile


@lru_cache(maxsize=1)
def _publisher() -> JobPublisher:
    return JobPublisher(get_settings(), celery_app)


@lru_cache(maxsize=1)
def _lifecycle() -> JobLifecycle:
    from workers.device import resolve_device

    settings = get_settings()
    return JobLifecycle(settings, _publisher(), resolve_device(settings.device))


def prepare_lifecycle() -> None:
    _lifecycle()


def run_reconcile() -> ReconcileReport:
    return reconcile(get_settings(), _publisher())


@celery_app.task(name=TASK_RUN_JOB, ignore_result=True)
def run_job(job_id: str) -> None:
    _lifecycle().execute(job_id)


@celery_app.task(name=TASK_RECONCILE, ignore_result=True)
def reconcile_task() -> None:
    run_reconcile()
