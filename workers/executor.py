"""Claims a job, runs it with a heartbeat, and records the outcome with a CAS on the lease."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.dispatch import JobPublisher
from core.enums import EventType, FailureType, JobKind, JobStatus
from core.errors import JobExpired, JobStopped, PermanentJobError, TransientJobError
from core.settings import Settings
from db.base import utcnow
from db.events import append_event
from db.jobs import claim, finish_job, get_job, requeue_job
from db.models import Job
from db.outputs import add_outputs
from db.registry import model_name, register_model
from db.session import session_scope
from workers.context import RunContext
from workers.heartbeat import Heartbeat
from workers.runners import RunResult, TrainedModel, runner_for

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """The final compare-and-set found another owner: nothing of ours is kept."""


@dataclass(frozen=True)
class ClaimedJob:
    kind: JobKind
    spec: dict[str, Any]
    ctx: RunContext
    model: str | None = None  # generation jobs: the base model they are served on


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def retry_delay(settings: Settings, attempts: int) -> float:
    return float(
        min(settings.retry_backoff_s * 2 ** max(attempts - 1, 0), settings.retry_backoff_max_s)
    )


class JobExecutor:
    def __init__(self, settings: Settings, publisher: JobPublisher, device: str) -> None:
        self._settings = settings
        self._publisher = publisher
        self._device = device
        self.worker = worker_identity()

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def device(self) -> str:
        return self._device

    def execute(self, job_id: str) -> None:
        self._publisher.take_marker(job_id)
        claimed = self.claim(job_id)
        if claimed is None:
            return
        if claimed.kind is JobKind.GENERATE:
            from workers.generation.jobs import GenerationBatchRun

            GenerationBatchRun(self, claimed).run()
            return
        run_ctx = claimed.ctx
        heartbeat = Heartbeat(self._settings, run_ctx, self.worker)
        heartbeat.start()
        try:
            result = self._run(claimed.kind, claimed.spec, run_ctx)
        except JobExpired:
            heartbeat.stop()  # the runner recorded `expired` itself, with its lines
            return
        except JobStopped:
            heartbeat.stop()
            self.stopped(run_ctx)
            return
        except PermanentJobError as exc:
            heartbeat.stop()
            self.fail(job_id, exc.failure, exc.message)
            return
        except (TransientJobError, OperationalError) as exc:
            heartbeat.stop()
            self._retry(job_id, run_ctx.attempt, str(exc))
            return
        except Exception as exc:
            heartbeat.stop()
            logger.exception("job %s failed", job_id)
            self.fail(job_id, FailureType.RUNTIME_ERROR, f"{type(exc).__name__}: {exc}")
            return
        heartbeat.stop()
        try:
            self.succeed(job_id, claimed.spec, result)
        except OperationalError:
            # Database unreachable: the lease expires and the reconciler retries the job.
            logger.exception("job %s: could not record its result", job_id)
        except Exception as exc:
            logger.exception("job %s: storing its result failed", job_id)
            self.fail(job_id, FailureType.RUNTIME_ERROR, f"storing the result failed: {exc}")

    def claim(self, job_id: str, *, from_message: bool = True) -> ClaimedJob | None:
        """queued -> running for this worker; None when someone else has it (or it ended).

        A message that finds its job not claimable is recorded as a dropped delivery;
        a job a batch tried to take (`from_message=False`) that another worker took is not.
        """
        ttl = timedelta(seconds=self._settings.lease_ttl_s)
        with session_scope(self._settings.database_url) as session:
            row = claim(session, job_id, self.worker, ttl)
            if row is not None:
                logger.info("job %s claimed by %s (attempt %d)", job_id, self.worker, row.attempts)
                return ClaimedJob(
                    kind=JobKind(row.kind),
                    spec=row.spec,
                    ctx=RunContext(
                        job_id=job_id,
                        attempt=row.attempts,
                        device=self._device,
                        worker=self.worker,
                    ),
                    model=row.model,
                )
            if not from_message:
                return None
            job = get_job(session, job_id)
            if job is None:
                logger.warning("message for unknown job %s dropped", job_id)
                return None
            append_event(
                session,
                job_id,
                EventType.LOG,
                f"delivery dropped by {self.worker}: job is {job.status}",
                {"worker": self.worker, "reason": "not_claimable", "status": job.status},
            )
            logger.info("job %s not claimable (%s); message dropped", job_id, job.status)
            return None

    def _run(self, kind: JobKind, spec: dict[str, Any], ctx: RunContext) -> RunResult:
        return runner_for(kind, self._settings).run(spec, ctx)

    def succeed(self, job_id: str, spec: dict[str, Any], result: RunResult) -> bool:
        """Store outputs, registry entry and `succeeded` in one transaction; False if the
        lease was lost first (then nothing is kept)."""
        summary = dict(result.result) if result.result is not None else None
        try:
            with session_scope(self._settings.database_url) as session:
                add_outputs(session, job_id, result.outputs)
                if result.trained_model is not None:
                    name = self._register(session, job_id, spec, result.trained_model)
                    summary = {**(summary or {}), "model": name}
                if not finish_job(
                    session, job_id, self.worker, JobStatus.SUCCEEDED, result=summary
                ):
                    raise LeaseLost(job_id)
        except LeaseLost:
            logger.warning("job %s: lease lost before commit; outputs discarded", job_id)
            return False
        logger.info("job %s succeeded with %d outputs", job_id, len(result.outputs))
        return True

    def _register(
        self, session: Session, job_id: str, spec: dict[str, Any], trained: TrainedModel
    ) -> str:
        name = model_name(trained.base_model, trained.task, spec.get("suffix"), job_id)
        register_model(
            session,
            name=name,
            base_model=trained.base_model,
            task=trained.task.value,
            method=trained.method.value,
            adapter=trained.adapter,
            job_id=job_id,
            path=str(trained.path.resolve().relative_to(self._settings.data_dir.resolve())),
            labels=list(trained.labels),
            metrics=dict(trained.metrics),
        )
        append_event(session, job_id, EventType.LOG, f"registered model {name}", {"model": name})
        return name

    def fail(self, job_id: str, failure: FailureType, message: str) -> None:
        with session_scope(self._settings.database_url) as session:
            won = finish_job(
                session,
                job_id,
                self.worker,
                JobStatus.FAILED,
                error_type=failure.value,
                error_message=message,
            )
        logger.info("job %s failed (%s); recorded=%s", job_id, failure.value, won)

    def stopped(self, ctx: RunContext) -> JobStatus | None:
        """Record a cancel seen while running; None when the lease was lost (nothing kept)."""
        if ctx.lease_lost or not ctx.cancelled:
            logger.warning("job %s: stopped after losing its lease; nothing recorded", ctx.job_id)
            return None
        with session_scope(self._settings.database_url) as session:
            won = finish_job(
                session, ctx.job_id, self.worker, JobStatus.CANCELLED, error_message=None
            )
        logger.info("job %s cancelled while running", ctx.job_id)
        return JobStatus.CANCELLED if won else None

    def _retry(self, job_id: str, attempts: int, message: str) -> None:
        with session_scope(self._settings.database_url) as session:
            job = session.get(Job, job_id)
            if job is None:
                return
            if attempts >= job.max_attempts:
                won = finish_job(
                    session,
                    job_id,
                    self.worker,
                    JobStatus.FAILED,
                    error_type=FailureType.TRANSIENT_ERROR.value,
                    error_message=f"{message} (after {attempts} attempts)",
                )
                logger.info("job %s out of attempts; failed=%s", job_id, won)
                return
            delay = retry_delay(self._settings, attempts)
            requeue_job(
                session,
                job_id,
                available_at=utcnow() + timedelta(seconds=delay),
                reason=f"transient error, retry in {delay:.0f}s: {message}",
                error_type=FailureType.TRANSIENT_ERROR.value,
                where=[Job.lease_owner == self.worker],
            )
        logger.info("job %s will retry in %.1fs", job_id, delay)
