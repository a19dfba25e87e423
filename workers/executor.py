"""Claims a job, runs it with a heartbeat, and records the outcome with a CAS on the lease."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import redis
from sqlalchemy.orm import Session

from core.dispatch import JobPublisher
from core.enums import EventType, FailureType, JobKind, JobStatus
from core.errors import JobError, JobExpired, JobStopped, TransientJobError
from core.logs import log_context
from core.settings import Settings
from core.storage import artifact_store
from db.base import utcnow
from db.events import append_event
from db.jobs import claim, expire_overdue, finish_job, get_job, give_back, requeue_job
from db.models import DEFAULT_TENANT, Job
from db.monitors import record_predictions
from db.outputs import add_outputs
from db.pauses import pause_running
from db.registry import model_name, register_model
from db.session import DATABASE_UNAVAILABLE, session_scope
from workers.context import RunContext
from workers.failures import classify, jittered_delay, retry_delay
from workers.heartbeat import Heartbeat
from workers.leases import broker_leases
from workers.runners import ClaimedJob, RunResult, TrainedModel, runner_for

logger = logging.getLogger(__name__)

PREDICTION = "prediction"  # an output's finish_reason in a predict job (may feed a monitor)
T = TypeVar("T")
__all__ = ["ClaimedJob", "JobExecutor", "LeaseLost", "retry_delay", "worker_identity"]


class LeaseLost(Exception):
    """The final compare-and-set found another owner: nothing of ours is kept."""


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ExecutorAttempt:
    """The `Attempt` (workers/runners.py) of one job that a decode group serves."""

    def __init__(self, executor: JobExecutor, claimed: ClaimedJob, heartbeat: Heartbeat) -> None:
        self._executor = executor
        self._claimed = claimed
        self._heartbeat = heartbeat

    @property
    def claimed(self) -> ClaimedJob:
        return self._claimed

    def end_heartbeat(self) -> None:
        self._heartbeat.stop()
        self._executor._release_lease(self._claimed.ctx.job_id)

    def succeed(self, result: RunResult) -> JobStatus | None:
        self.end_heartbeat()
        won = self._executor.succeed(self._claimed.ctx.job_id, self._claimed.spec, result)
        return JobStatus.SUCCEEDED if won else None

    def fail(self, failure: FailureType, message: str) -> JobStatus | None:
        self.end_heartbeat()
        self._executor.fail(self._claimed.ctx.job_id, failure, message)
        return JobStatus.FAILED

    def failed(self, exc: BaseException) -> JobStatus | None:
        self.end_heartbeat()
        error = classify(exc, self._executor.settings, self._executor.device)
        if isinstance(error, TransientJobError):
            self._executor._retry(self._claimed.ctx.job_id, self._claimed.ctx.attempt, error)
            return None
        self._executor.fail(self._claimed.ctx.job_id, error.failure, error.message)
        return JobStatus.FAILED

    def stopped(self) -> JobStatus | None:
        self.end_heartbeat()
        return self._executor.stopped(self._claimed.ctx)


class JobExecutor:
    def __init__(self, settings: Settings, publisher: JobPublisher, device: str) -> None:
        self._settings = settings
        self._publisher = publisher
        self._device = device
        self._leases = broker_leases(settings.broker_url)
        self.worker = worker_identity()

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def device(self) -> str:
        return self._device

    def execute(self, job_id: str) -> None:
        with log_context(job_id=job_id):
            self._execute(job_id)

    def _execute(self, job_id: str) -> None:
        self._publisher.take_marker(job_id)
        claimed = self.claim(job_id)
        if claimed is None:
            return
        if claimed.kind is JobKind.GENERATE:
            from workers.generation.group import serve_generation

            first = self._begin(claimed)
            try:
                serve_generation(self, first)
            finally:
                first.end_heartbeat()
            return
        run_ctx = claimed.ctx
        heartbeat = Heartbeat(self._settings, run_ctx, self.worker, self._leases)
        heartbeat.start()
        try:
            try:
                result = self._run(claimed.kind, claimed.spec, run_ctx)
            except JobExpired:
                heartbeat.stop()  # the runner recorded `expired` itself, with its lines
                return
            except JobStopped:
                heartbeat.stop()
                self.stopped(run_ctx)
                return
            except Exception as exc:
                heartbeat.stop()
                self._attempt_failed(run_ctx, exc)
                return
            heartbeat.stop()
            self._record_success(job_id, claimed.spec, result)
        except DATABASE_UNAVAILABLE:
            # Still unreachable after db_retry_s: the leases expire and the reconciler
            # runs the job again (from its last checkpoint).
            logger.exception("job %s: could not record its outcome", job_id)
        finally:
            heartbeat.stop()
            self._release_lease(job_id)

    def _begin(self, claimed: ClaimedJob) -> ExecutorAttempt:
        heartbeat = Heartbeat(self._settings, claimed.ctx, self.worker, self._leases)
        heartbeat.start()
        return ExecutorAttempt(self, claimed, heartbeat)

    def claim_and_begin(self, job_id: str) -> ExecutorAttempt | None:
        """A job a decode group takes in: claimed without a message, heartbeat started."""
        claimed = self.claim(job_id, from_message=False)
        return self._begin(claimed) if claimed is not None else None

    def _record_success(self, job_id: str, spec: dict[str, Any], result: RunResult) -> None:
        try:
            self.succeed(job_id, spec, result)
        except DATABASE_UNAVAILABLE:
            raise
        except Exception as exc:
            logger.exception("job %s: storing its result failed", job_id)
            self.fail(job_id, FailureType.RUNTIME_ERROR, f"storing the result failed: {exc}")

    def _attempt_failed(self, ctx: RunContext, exc: Exception) -> None:
        error = classify(exc, self._settings, self._device)
        if not isinstance(exc, JobError):
            logger.exception(
                "job %s: attempt %d failed (%s)", ctx.job_id, ctx.attempt, error.failure
            )
        if isinstance(error, TransientJobError):
            self._retry(ctx.job_id, ctx.attempt, error)
        else:
            self.fail(ctx.job_id, error.failure, error.message)

    def _write(self, job_id: str, what: str, write: Callable[[], T]) -> T:
        """Run a database write, retrying for up to db_retry_s while the database is
        unreachable and keeping the job's broker lease alive meanwhile."""
        deadline = time.monotonic() + self._settings.db_retry_s
        delay = 0.5
        warned = False
        while True:
            try:
                return write()
            except DATABASE_UNAVAILABLE as exc:
                if time.monotonic() + delay > deadline:
                    raise
                if not warned:
                    logger.warning(
                        "job %s: database unreachable while recording %s (%s); retrying for up "
                        "to %.0fs",
                        job_id,
                        what,
                        type(exc).__name__,
                        self._settings.db_retry_s,
                    )
                    warned = True
                self._keep_lease(job_id)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _keep_lease(self, job_id: str) -> None:
        with contextlib.suppress(redis.RedisError):
            self._leases.renew(job_id, self.worker, self._settings.lease_ttl_s)

    def _release_lease(self, job_id: str) -> None:
        with contextlib.suppress(redis.RedisError):
            self._leases.release(job_id, self.worker)

    def claim(self, job_id: str, *, from_message: bool = True) -> ClaimedJob | None:
        """queued -> running for this worker; None when someone else has it (or it ended).

        A message that finds its job not claimable is recorded as a dropped delivery;
        a job a batch tried to take (`from_message=False`) that another worker took is not.
        """
        ttl = timedelta(seconds=self._settings.lease_ttl_s)
        with session_scope(self._settings.database_url) as session:
            row = claim(session, job_id, self.worker, ttl, self._settings.max_running_jobs)
            if row is not None:
                logger.info("job %s claimed by %s (attempt %d)", job_id, self.worker, row.attempts)
                limit = self._settings.job_time_limit_s
                if row.max_runtime_s is not None:
                    limit = min(limit, row.max_runtime_s)
                return ClaimedJob(
                    kind=JobKind(row.kind),
                    spec=row.spec,
                    ctx=RunContext(
                        job_id=job_id,
                        tenant_id=row.tenant_id,
                        attempt=row.attempts,
                        device=self._device,
                        worker=self.worker,
                        deadline=time.monotonic() + limit,
                        max_runtime_s=limit,
                    ),
                    model=row.model,
                )
            if not from_message:
                return None
            job = get_job(session, job_id)
            if job is None:
                logger.warning("message for unknown job %s dropped", job_id)
                return None
            if job.status == JobStatus.QUEUED.value and expire_overdue(session, job_id, utcnow()):
                logger.info("job %s expired before it started; message dropped", job_id)
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

        def write() -> None:
            summary = dict(result.result) if result.result is not None else None
            with session_scope(self._settings.database_url) as session:
                add_outputs(session, job_id, result.outputs)
                if any(o.finish_reason == PREDICTION for o in result.outputs):
                    record_predictions(session, job_id, result.outputs)
                if result.trained_model is not None:
                    name = self._register(session, job_id, spec, result.trained_model)
                    summary = {**(summary or {}), "model": name}
                if not finish_job(
                    session, job_id, self.worker, JobStatus.SUCCEEDED, result=summary
                ):
                    raise LeaseLost(job_id)

        try:
            self._write(job_id, "its result", write)
        except LeaseLost:
            logger.warning("job %s: lease lost before commit; outputs discarded", job_id)
            return False
        logger.info("job %s succeeded with %d outputs", job_id, len(result.outputs))
        return True

    def _register(
        self, session: Session, job_id: str, spec: dict[str, Any], trained: TrainedModel
    ) -> str:
        name = model_name(trained.base_model, trained.task, spec.get("suffix"), job_id)
        artifact_store(self._settings).publish(trained.path)
        job = get_job(session, job_id)
        register_model(
            session,
            tenant_id=job.tenant_id if job is not None else DEFAULT_TENANT,
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
        def write() -> bool:
            with session_scope(self._settings.database_url) as session:
                return finish_job(
                    session,
                    job_id,
                    self.worker,
                    JobStatus.FAILED,
                    error_type=failure.value,
                    error_message=message,
                )

        won = self._write(job_id, "its failure", write)
        logger.info("job %s failed (%s); recorded=%s", job_id, failure.value, won)

    def _finish(
        self,
        ctx: RunContext,
        target: JobStatus,
        failure: FailureType | None = None,
        message: str | None = None,
    ) -> bool:
        def write() -> bool:
            with session_scope(self._settings.database_url) as session:
                return finish_job(
                    session,
                    ctx.job_id,
                    self.worker,
                    target,
                    error_type=failure.value if failure else None,
                    error_message=message,
                )

        return self._write(ctx.job_id, f"status {target.value}", write)

    def stopped(self, ctx: RunContext) -> JobStatus | None:
        """Record why a running job stopped: cancelled, timed out (failed), paused, or handed
        back for another worker (None); None as well when the lease was lost (nothing is
        kept)."""
        if ctx.lease_lost:
            logger.warning("job %s: stopped after losing its lease; nothing recorded", ctx.job_id)
            self._note(ctx, "stopped its attempt: lease lost", "lease_lost")
            return None
        if ctx.cancelled:
            won = self._finish(ctx, JobStatus.CANCELLED)
            logger.info("job %s cancelled while running", ctx.job_id)
            return JobStatus.CANCELLED if won else None
        if ctx.timed_out:
            limit = f"{ctx.max_runtime_s:g}s" if ctx.max_runtime_s is not None else "its limit"
            won = self._finish(
                ctx,
                JobStatus.FAILED,
                FailureType.TIMED_OUT,
                f"stopped at its run time limit of {limit} (max_runtime_s, or the workers' "
                "job_time_limit_s)",
            )
            logger.info("job %s timed out after %s", ctx.job_id, limit)
            return JobStatus.FAILED if won else None
        if ctx.paused:
            won = self._write(ctx.job_id, "its pause", lambda: self._pause(ctx))
            logger.info("job %s paused; recorded=%s", ctx.job_id, won)
            return JobStatus.PAUSED if won else None
        if ctx.given_back:
            self.give_back(ctx)
            return None
        logger.warning("job %s stopped without a reason; nothing recorded", ctx.job_id)
        return None

    def _pause(self, ctx: RunContext) -> bool:
        with session_scope(self._settings.database_url) as session:
            return pause_running(session, ctx.job_id, self.worker)

    def give_back(self, ctx: RunContext) -> None:
        """queued again and published, so another worker takes it (this one is stopping)."""

        def write() -> tuple[JobKind, int] | None:
            with session_scope(self._settings.database_url) as session:
                return give_back(session, ctx.job_id, self.worker)

        back = self._write(ctx.job_id, "its hand-back", write)
        if back is None:
            logger.warning("job %s: lease lost before it could be given back", ctx.job_id)
            return
        kind, priority = back
        try:
            self._publisher.publish(ctx.job_id, kind, priority)
        except Exception as exc:  # the reconciler republishes it once the broker answers
            logger.warning("job %s given back but not published: %s", ctx.job_id, exc)
        logger.info("job %s given back by %s (shutting down)", ctx.job_id, self.worker)

    def _note(self, ctx: RunContext, message: str, reason: str) -> None:
        """A best-effort log event that this worker's attempt ended (no status change)."""
        try:
            with session_scope(self._settings.database_url) as session:
                append_event(
                    session,
                    ctx.job_id,
                    EventType.LOG,
                    f"{self.worker} {message}",
                    {"by": self.worker, "reason": reason},
                )
        except DATABASE_UNAVAILABLE:
            logger.warning("job %s: could not record that its attempt ended", ctx.job_id)

    def _retry(self, job_id: str, attempts: int, error: TransientJobError) -> None:
        failure = error.failure.value

        def write() -> float | None:
            with session_scope(self._settings.database_url) as session:
                job = session.get(Job, job_id)
                if job is None:
                    return None
                if attempts >= job.max_attempts:
                    won = finish_job(
                        session,
                        job_id,
                        self.worker,
                        JobStatus.FAILED,
                        error_type=failure,
                        error_message=f"{error.message} (after {attempts} attempts)",
                    )
                    logger.info("job %s out of attempts (%s); failed=%s", job_id, failure, won)
                    return None
                delay = jittered_delay(self._settings, attempts)
                requeue_job(
                    session,
                    job_id,
                    available_at=utcnow() + timedelta(seconds=delay),
                    reason=f"{failure} (transient), retry in {delay:.1f}s: {error.message}",
                    error_type=failure,
                    where=[Job.lease_owner == self.worker],
                    by=self.worker,
                )
                return delay

        delay = self._write(job_id, "its retry", write)
        if delay is not None:
            logger.info("job %s will retry in %.1fs (%s)", job_id, delay, failure)
