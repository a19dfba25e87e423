"""Thin Celery tasks: they take a job id and hand it to the lifecycle."""

from __future__ import annotations

from core.dispatch import TASK_RECONCILE, TASK_RUN_JOB
from workers import runtime
from workers.app import celery_app


@celery_app.task(name=TASK_RUN_JOB, ignore_result=True)
def run_job(job_id: str) -> None:
    runtime.lifecycle().execute(job_id)


@celery_app.task(name=TASK_RECONCILE, ignore_result=True)
def reconcile_task() -> None:
    runtime.run_reconcile()
