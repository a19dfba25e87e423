"""Thin Celery tasks: they take a job id and hand it to the executor."""

from __future__ import annotations

from functools import lru_cache

from core.dispatch import TASK_RECONCILE, TASK_RUN_JOB, JobPublisher
from core.settings import get_settings
from workers.app import celery_app
from workers.executor import JobExecutor
from workers.reconciler import ReconcileReport, reconcile


@lru_cache(maxsize=1)
def _publisher() -> JobPublisher:
    return JobPublisher(get_settings(), celery_app)


@lru_cache(maxsize=1)
def _executor() -> JobExecutor:
    from workers.device import resolve_device

    settings = get_settings()
    return JobExecutor(settings, _publisher(), resolve_device(settings.device))


def prepare_executor() -> None:
    _executor()


def run_reconcile() -> ReconcileReport:
    return reconcile(get_settings(), _publisher())


@celery_app.task(name=TASK_RUN_JOB, ignore_result=True)
def run_job(job_id: str) -> None:
    _executor().execute(job_id)


@celery_app.task(name=TASK_RECONCILE, ignore_result=True)
def reconcile_task() -> None:
    run_reconcile()
