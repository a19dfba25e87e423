"""The one lifecycle every job kind goes through: claim, run with a heartbeat, and end the
attempt (succeed, fail, retry, hand back, pause, stop), each end a compare-and-set on the
attempt number.

A job is claimed from its message (`execute`) or by a runner that serves several jobs at
once (`claim_ready`: the jobs that join a generation decode group or an embedding round,
claimed together in one transaction). Either way it becomes an
`AttemptRun`: the heartbeat renews both leases for that attempt, and exactly one ending call
records the outcome through the repository functions of db/attempts.py. A runner that
does not stop within `stop_grace_s` of its run time limit or of a lost lease is overdue:
its outcome is recorded (failed `timed_out`, or nothing when the lease was lost) and the
worker process restarts in place (workers/restart.py).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import redis
from sqlalchemy.orm import Session

from core.dispatch import JobPublisher
from core.enums import EventType, FailureType, JobKind, JobStatus
from core.errors import (
    JobError,
    JobExpired,
    JobStopped,
    PermanentJobError,
    StaleAttempt,
    TransientJobError,
)
from core.logs import log_context
from core.settings import Settings
from core.storage import artifact_store
from db.attempts import (
    cancel_attempt,
    end_attempt,
    hand_back,
    pause_attempt,
    retry_attempt,
)
from db.base import utcnow
from db.events import append_event
from db.fencing import fence_reading_cancel
from db.jobs import ClaimedRow, claim, claim_many, expire_overdue, get_job, ready_for_model
from db.models import DEFAULT_TENANT
from db.monitors import record_predictions
from db.outputs import add_outputs
from db.registry import model_name, register_model
from db.session import DATABASE_UNAVAILABLE, session_scope
from workers.context import RunContext, worker_identity
from workers.failures import classify, is_disk_full, jittered_delay
from workers.heartbeat import Heartbeat
from workers.leases import broker_leases
from workers.restart import restart_process
from workers.runners import Attempt, ClaimedJob, Runner, RunResult, TrainedModel

logger = logging.getLogger(__name__)

PREDICTION = "prediction"  # an output's finish_reason in a predict job (may feed a monitor)
T = TypeVar("T")
__all__ = ["AttemptRun", "JobLifecycle"]


def runner_for(kind: JobKind, settings: Settings) -> Runner:
    """The runner of a single job of `kind`, imported on first use in the process that runs
    it (generation jobs are served by a decode group instead, see `JobLifecycle.run`)."""
    if kind is JobKind.FINETUNE:
        from workers.training.launch import ChildProcessRunner

        return ChildProcessRunner(settings)
    if kind is JobKind.PREDICT:
        from workers.training.db_io import DbTrainingIO
        from workers.training.predict import PredictRunner

        return PredictRunner(settings, lambda ctx: DbTrainingIO(settings, ctx))
    if kind is JobKind.NOOP:
        from workers.noop import NoopRunner

        return NoopRunner()
    if kind is JobKind.BATCH:
        from workers.batch.runner import BatchRunner

        return BatchRunner(settings)
    raise PermanentJobError(f"no runner for kind {kind}", FailureType.INVALID_SPEC)


def _run_time_limit(ctx: RunContext) -> str:
    return f"{ctx.max_runtime_s:g}s" if ctx.max_runtime_s is not None else "its limit"


class _Lost(Exception):
    """The attempt's final compare-and-set found the job held by a newer attempt."""


class JobLifecycle:
    """Claims jobs for this worker and runs each attempt to its recorded end."""

    def __init__(
        self,
        settings: Settings,
        publisher: JobPublisher,
        device: str,
        *,
        restart: Callable[[str], None] = restart_process,
    ) -> None:
        self._settings = settings
        self._publisher = publisher
        self._device = device
        self._restart = restart
        self.leases = broker_leases(settings.broker_url)
        self._worker = worker_identity()

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def device(self) -> str:
        return self._device

    @property
    def worker(self) -> str:
        return self._worker

    # -- entry points --------------------------------------------------------------------
    def execute(self, job_id: str) -> None:
        """The task's entry: claim the job of this message and run it to its end."""
        with log_context(job_id=job_id):
            claimed = self.claim(job_id)
            if claimed is None:
                return
            self.run(self.begin(claimed))

    def claim_and_begin(self, job_id: str) -> Attempt | None:
        claimed = self.claim(job_id, from_message=False)
        return None if claimed is None else self.begin(claimed)

    def claim_ready(self, kind: JobKind, model: str, limit: int, note: str) -> list[Attempt]:
        """Claim up to `limit` ready jobs of `kind` on `model` in one transaction (no
        message: a runner serving several jobs asked for them) and start their attempts,
        highest priority first; `note` is recorded as each one's event after its claim."""
        if limit <= 0:
            return []
        settings = self._settings
        with session_scope(settings.database_url, readonly=True) as session:
            ids = list(ready_for_model(session, kind, model, utcnow(), limit))
        if not ids:
            return []
        ttl = timedelta(seconds=settings.lease_ttl_s)
        leased_at = time.monotonic()
        with session_scope(settings.database_url) as session:
            rows = claim_many(session, ids, self._worker, ttl, settings.max_running_jobs, note=note)
        logger.info("%d %s jobs on %s claimed by %s", len(rows), kind.value, model, self._worker)
        return [self.begin(self._claimed(job_id, row, leased_at)) for job_id, row in rows.items()]

    def begin(self, claimed: ClaimedJob) -> AttemptRun:
        attempt = AttemptRun(self, claimed)
        attempt.start()
        return attempt

    def run(self, attempt: AttemptRun) -> None:
        """Run a begun attempt with the runner of its kind and record how it ended."""
        claimed = attempt.claimed
        if claimed.kind is JobKind.GENERATE:
            from workers.generation.jobs import serve_generation

            try:
                serve_generation(self, attempt)
            finally:
                attempt.abandon_if_open()
            return
        if claimed.kind is JobKind.EMBED:
            from workers.embedding.jobs import serve_embeddings

            try:
                serve_embeddings(self, attempt)
            finally:
                attempt.abandon_if_open()
            return
        ctx = claimed.ctx
        try:
            # No read of the cancel flag here: the claim just found it unset in its
            # compare-and-set; the heartbeat reads it from then on, and the ending's
            # compare-and-set makes a cancel asked meanwhile win.
            result = runner_for(claimed.kind, self._settings).run(claimed.spec, ctx)
        except JobExpired:
            attempt.expired()  # the runner recorded `expired` itself, with its lines
        except JobStopped as exc:
            if isinstance(exc, StaleAttempt):
                ctx.lease_lost = True
            attempt.stopped()
        except Exception as exc:
            attempt.failed(exc)
        else:
            attempt.succeed(result)

    def claim(self, job_id: str, *, from_message: bool = True) -> ClaimedJob | None:
        """queued -> running for this worker, as a new attempt; None when someone else has
        it (or it ended). A message that finds its job not claimable is recorded as a
        dropped delivery; a job a runner tried to take (`from_message=False`) is not."""
        ttl = timedelta(seconds=self._settings.lease_ttl_s)
        leased_at = time.monotonic()
        with session_scope(self._settings.database_url) as session:
            row = claim(session, job_id, self._worker, ttl, self._settings.max_running_jobs)
            if row is not None:
                logger.info("job %s claimed by %s (attempt %d)", job_id, self._worker, row.attempts)
                return self._claimed(job_id, row, leased_at)
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
                f"delivery dropped by {self._worker}: job is {job.status}",
                {"worker": self._worker, "reason": "not_claimable", "status": job.status},
            )
            logger.info("job %s not claimable (%s); message dropped", job_id, job.status)
            return None

    def _claimed(self, job_id: str, row: ClaimedRow, leased_at: float) -> ClaimedJob:
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
                worker=self._worker,
                deadline=time.monotonic() + limit,
                max_runtime_s=limit,
                leased_at=leased_at,
            ),
            model=row.model,
        )

    # -- what attempts share -------------------------------------------------------------
    def write(self, job_id: str, what: str, write: Callable[[], T], keep: Callable[[], Any]) -> T:
        """Run a database write, retrying for up to db_retry_s while the database is
        unreachable and calling `keep` (renew the broker lease) meanwhile."""
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
                with contextlib.suppress(redis.RedisError):
                    keep()
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def register(
        self, session: Session, ctx: RunContext, spec: dict[str, Any], trained: TrainedModel
    ) -> str:
        """Publish the attempt's model directory (its own path) and register it; called
        inside the finishing transaction, after the fence."""
        name = model_name(trained.base_model, trained.task, spec.get("suffix"), ctx.job_id)
        artifact_store(self._settings).publish(trained.path)
        job = get_job(session, ctx.job_id)
        register_model(
            session,
            tenant_id=job.tenant_id if job is not None else DEFAULT_TENANT,
            name=name,
            base_model=trained.base_model,
            task=trained.task.value,
            method=trained.method.value,
            adapter=trained.adapter,
            job_id=ctx.job_id,
            path=str(trained.path.resolve().relative_to(self._settings.data_dir.resolve())),
            labels=list(trained.labels),
            metrics=dict(trained.metrics),
        )
        append_event(
            session, ctx.job_id, EventType.LOG, f"registered model {name}", {"model": name}
        )
        return name

    def overdue(self, ctx: RunContext) -> None:
        """The heartbeat's call for a runner that ignored its stop flag past the grace:
        record the outcome, then restart this process (which ends the runner)."""
        if ctx.timed_out and not ctx.lease_lost:
            limit = _run_time_limit(ctx)
            try:
                with session_scope(self._settings.database_url) as session:
                    status = end_attempt(
                        session,
                        ctx.job_id,
                        JobStatus.FAILED,
                        attempt=ctx.attempt,
                        by=self._worker,
                        error_type=FailureType.TIMED_OUT.value,
                        error_message=f"did not stop within {self._settings.stop_grace_s:g}s "
                        f"of its run time limit of {limit}; its worker process was restarted",
                    )
                logger.error("job %s: overdue runner; recorded %s", ctx.job_id, status)
            except DATABASE_UNAVAILABLE:
                logger.exception("job %s: overdue runner; outcome not recorded", ctx.job_id)
        with contextlib.suppress(redis.RedisError):
            self.leases.release(ctx.job_id, self._worker, ctx.attempt)
        self._restart(f"job {ctx.job_id} attempt {ctx.attempt} did not stop ({ctx.stop_reason})")

    def publish(self, job_id: str, kind: JobKind, priority: int) -> None:
        try:
            self._publisher.publish(job_id, kind, priority)
        except Exception as exc:  # the reconciler republishes it once the broker answers
            logger.warning("job %s queued again but not published: %s", job_id, exc)


class AttemptRun:
    """One attempt of one job (the `Attempt` protocol of workers/runners.py)."""

    def __init__(self, lifecycle: JobLifecycle, claimed: ClaimedJob) -> None:
        self._lc = lifecycle
        self._claimed = claimed
        self._settings = lifecycle.settings
        self._heartbeat = Heartbeat(
            lifecycle.settings,
            claimed.ctx,
            lifecycle.worker,
            lifecycle.leases,
            on_overdue=lifecycle.overdue,
        )
        self._ended = False
        self._broker_lease_kept = False  # set by a renewal while a write waited on the database

    @property
    def claimed(self) -> ClaimedJob:
        return self._claimed

    @property
    def ctx(self) -> RunContext:
        return self._claimed.ctx

    @property
    def job_id(self) -> str:
        return self._claimed.ctx.job_id

    def start(self) -> None:
        self._heartbeat.start()

    # -- endings -------------------------------------------------------------------------
    def succeed(self, result: RunResult) -> JobStatus | None:
        """Outputs, registry entry and `succeeded` in one transaction behind the fence; a
        cancel asked before it commits wins (nothing stored, no model registered).

        A commit whose outcome is unknown (the connection dropped during COMMIT) is settled
        by reading the job before anything is thrown away: when it landed, the job is
        succeeded by this attempt and its registered model stays."""
        ctx = self.ctx
        commit_unknown = False  # a try reached COMMIT and raised: it may have landed

        def write() -> JobStatus:
            nonlocal commit_unknown
            summary = dict(result.result) if result.result is not None else None
            with session_scope(self._settings.database_url) as session:
                # The fence guards what is written before the ending (every row and file of
                # the job is older than its finished_at); with nothing to write, the ending's
                # own compare-and-set is the fence (a pending cancel wins there too).
                writes = bool(result.outputs) or result.trained_model is not None
                cancel = fence_reading_cancel(session, ctx.job_id, ctx.attempt) if writes else False
                if cancel is None:
                    raise _Lost(ctx.job_id)
                if cancel:
                    if not cancel_attempt(
                        session,
                        ctx.job_id,
                        attempt=ctx.attempt,
                        by=self._lc.worker,
                        message="cancelled before its result was stored",
                    ):
                        raise _Lost(ctx.job_id)
                    return JobStatus.CANCELLED
                add_outputs(session, ctx.job_id, result.outputs)
                if any(o.finish_reason == PREDICTION for o in result.outputs):
                    record_predictions(session, ctx.job_id, result.outputs)
                if result.trained_model is not None:
                    name = self._lc.register(session, ctx, self._claimed.spec, result.trained_model)
                    summary = {**(summary or {}), "model": name}
                status = end_attempt(
                    session,
                    ctx.job_id,
                    JobStatus.SUCCEEDED,
                    attempt=ctx.attempt,
                    by=self._lc.worker,
                    result=summary,
                )
                if status is None:
                    raise _Lost(ctx.job_id)
                # CANCELLED: only when nothing was fenced (a cancel the ending found first)
                commit_unknown = status is JobStatus.SUCCEEDED  # committed as this block ends
            commit_unknown = False
            return status

        self._stop_heartbeat()
        landed: bool | None = False  # None: a COMMIT raised and the database cannot say now
        try:
            status: JobStatus | None = self._write("its result", write)
        except _Lost:
            landed = self._landed() if commit_unknown else False
            status = JobStatus.SUCCEEDED if landed else None
            if landed is False:
                logger.warning(
                    "job %s: attempt %d lost the job before its result committed "
                    "(compare-and-set on the attempt failed); outputs discarded",
                    ctx.job_id,
                    ctx.attempt,
                )
        except DATABASE_UNAVAILABLE:
            logger.exception("job %s: could not record its result", ctx.job_id)
            landed = self._landed() if commit_unknown else False
            status = JobStatus.SUCCEEDED if landed else None
        except Exception as exc:  # rolled back: nothing of the result is stored
            logger.exception("job %s: storing its result failed", ctx.job_id)
            if result.trained_model is not None:
                self._discard_unregistered(result.trained_model.path)
            if is_disk_full(exc):  # publishing the model filled a disk: try again later
                return self.failed(
                    TransientJobError(f"disk full storing the result: {exc}", FailureType.DISK_FULL)
                )
            return self.fail(FailureType.RUNTIME_ERROR, f"storing the result failed: {exc}")
        if landed is None and result.trained_model is not None:
            logger.error(
                "job %s: whether attempt %d's result committed is unknown (the database is "
                "unreachable); its model stays at %s",
                ctx.job_id,
                ctx.attempt,
                result.trained_model.path,
            )
        elif status is not JobStatus.SUCCEEDED and result.trained_model is not None:
            self._discard_unregistered(result.trained_model.path)
        if status is JobStatus.SUCCEEDED:
            logger.info("job %s succeeded with %d outputs", ctx.job_id, len(result.outputs))
        elif status is JobStatus.CANCELLED:
            logger.info("job %s cancelled before its result was stored", ctx.job_id)
        self._release()
        return status

    def fail(self, failure: FailureType, message: str) -> JobStatus | None:
        return self._end(
            f"its failure ({failure.value})",
            lambda session: end_attempt(
                session,
                self.job_id,
                JobStatus.FAILED,
                attempt=self.ctx.attempt,
                by=self._lc.worker,
                error_type=failure.value,
                error_message=message,
            ),
        )

    def failed(self, exc: BaseException) -> JobStatus | None:
        """Classify an exception out of the runner: retry a transient one, fail the rest."""
        ctx = self.ctx
        if isinstance(exc, StaleAttempt):
            ctx.lease_lost = True
            return self.stopped()
        error = classify(exc, self._settings, ctx.device)
        if not isinstance(exc, JobError):
            logger.error(
                "job %s: attempt %d failed (%s)",
                ctx.job_id,
                ctx.attempt,
                error.failure,
                exc_info=exc,
            )
        if not isinstance(error, TransientJobError):
            return self.fail(error.failure, error.message)
        delay = jittered_delay(self._settings, ctx.attempt)
        message = f"{error.failure.value} (transient), retry in {delay:.1f}s: {error.message}"
        status = self._end(
            "its retry",
            lambda session: retry_attempt(
                session,
                ctx.job_id,
                attempt=ctx.attempt,
                delay_s=delay,
                failure=error.failure,
                message=message,
                by=self._lc.worker,
            ),
        )
        if status is JobStatus.QUEUED:
            logger.info("job %s will retry in %.1fs (%s)", ctx.job_id, delay, error.failure)
        return status

    def stopped(self) -> JobStatus | None:
        """Record why the runner stopped: cancelled, timed out (failed), paused, handed back
        (queued and published), or nothing when the lease was lost. A cancel asked
        meanwhile wins over all but a lost lease."""
        ctx = self.ctx
        by = self._lc.worker
        if ctx.lease_lost:
            self._stop_heartbeat()
            logger.warning("job %s: attempt %d stopped after losing its lease", *self._ids())
            self._note("stopped its attempt: lease lost", "lease_lost")
            self._release()
            return None
        if ctx.cancelled:
            return self._end(
                "its cancel",
                lambda session: (
                    JobStatus.CANCELLED
                    if cancel_attempt(session, ctx.job_id, attempt=ctx.attempt, by=by, message="")
                    else None
                ),
            )
        if ctx.timed_out:
            return self.fail(
                FailureType.TIMED_OUT,
                f"stopped at its run time limit of {_run_time_limit(ctx)} (max_runtime_s, or "
                "the workers' job_time_limit_s)",
            )
        if ctx.paused:
            return self._end(
                "its pause",
                lambda session: pause_attempt(session, ctx.job_id, attempt=ctx.attempt, by=by),
            )
        if ctx.given_back:
            return self._hand_back()
        logger.warning("job %s: attempt %d stopped without a reason", *self._ids())
        return self.fail(FailureType.RUNTIME_ERROR, "the runner stopped without a reason")

    def _landed(self) -> bool | None:
        """Whether this attempt's success committed (read after a COMMIT that raised); None
        when the database cannot say now."""
        try:
            with session_scope(self._settings.database_url, readonly=True) as session:
                job = get_job(session, self.job_id)
                found = job is not None and (job.status, job.attempts) == (
                    JobStatus.SUCCEEDED.value,
                    self.ctx.attempt,
                )
        except DATABASE_UNAVAILABLE:
            return None
        if found:
            logger.warning(
                "job %s: attempt %d's result had committed though its COMMIT raised",
                *self._ids(),
            )
        return found

    def _discard_unregistered(self, path: Path) -> None:
        """The attempt's model directory, never registered: gone locally and from shared
        storage (the finishing transaction may have published it before it failed)."""
        shutil.rmtree(path, ignore_errors=True)
        try:
            artifact_store(self._settings).remove(path)
        except Exception as exc:
            logger.warning(
                "job %s: unregistered model not removed from storage: %s", self.job_id, exc
            )

    def abandon_if_open(self) -> None:
        """Stop the heartbeat of an attempt its runner left without an end (a bug, or an
        error the runner could not record): the lease expires and the reconciler decides."""
        if self._ended:
            return
        logger.error(
            "job %s: attempt %d was left without an end; its lease will expire", *self._ids()
        )
        self._stop_heartbeat()
        self._ended = True

    def expired(self) -> None:
        """The runner recorded `expired` itself (a batch past its completion window)."""
        self._stop_heartbeat()
        self._release()

    # -- helpers -------------------------------------------------------------------------
    def _ids(self) -> tuple[str, int]:
        return self.ctx.job_id, self.ctx.attempt

    def _hand_back(self) -> JobStatus | None:
        ctx = self.ctx
        self._stop_heartbeat()

        def write() -> Any:
            with session_scope(self._settings.database_url) as session:
                return hand_back(session, ctx.job_id, attempt=ctx.attempt, by=self._lc.worker)

        try:
            back = self._write("its hand-back", write)
        except DATABASE_UNAVAILABLE:
            logger.exception("job %s: could not record its hand-back", ctx.job_id)
            back = None
        self._release()
        if back is None:
            self._lost("its hand-back")
            return None
        if back.status is JobStatus.QUEUED:
            self._lc.publish(ctx.job_id, back.kind, back.priority)
            logger.info("job %s given back by %s (shutting down)", ctx.job_id, self._lc.worker)
            return None
        logger.info("job %s cancelled instead of being given back", ctx.job_id)
        return JobStatus(back.status)

    def _end(
        self, what: str, transition: Callable[[Session], JobStatus | None]
    ) -> JobStatus | None:
        """Stop the heartbeat, run one ending transition in its own transaction (retried
        while the database is away), release the broker lease; log a lost CAS as such."""
        self._stop_heartbeat()

        def write() -> JobStatus | None:
            with session_scope(self._settings.database_url) as session:
                return transition(session)

        try:
            status = self._write(what, write)
        except DATABASE_UNAVAILABLE:
            # Still unreachable after db_retry_s: the leases expire and the reconciler
            # runs the job again (from its last checkpoint).
            logger.exception("job %s: could not record %s", self.job_id, what)
            status = None
        self._release()
        if status is None:
            self._lost(what)
        else:
            logger.info("job %s: attempt %d recorded %s", *self._ids(), status.value)
        return status

    def _lost(self, what: str) -> None:
        logger.warning(
            "job %s: attempt %d no longer holds the job; %s not recorded (compare-and-set lost)",
            *self._ids(),
            what,
        )

    def _write(self, what: str, write: Callable[[], T]) -> T:
        ctx = self.ctx
        return self._lc.write(
            ctx.job_id,
            what,
            write,
            self._keep_broker_lease,
        )

    def _keep_broker_lease(self) -> None:
        ctx = self.ctx
        self._lc.leases.renew(ctx.job_id, self._lc.worker, ctx.attempt, self._settings.lease_ttl_s)
        self._broker_lease_kept = True

    def _stop_heartbeat(self) -> None:
        self._heartbeat.stop()
        self._ended = True

    def _release(self) -> None:
        """Drop the attempt's broker lease, if it was ever set (after the heartbeat stopped)."""
        if not (self._heartbeat.broker_lease_taken or self._broker_lease_kept):
            return
        with contextlib.suppress(redis.RedisError):
            self._lc.leases.release(self.ctx.job_id, self._lc.worker, self.ctx.attempt)

    def _note(self, message: str, reason: str) -> None:
        """A best-effort log event that this worker's attempt ended (no status change)."""
        try:
            with session_scope(self._settings.database_url) as session:
                append_event(
                    session,
                    self.job_id,
                    EventType.LOG,
                    f"{self._lc.worker} {message}",
                    {"by": self._lc.worker, "reason": reason, "attempt": self.ctx.attempt},
                )
        except DATABASE_UNAVAILABLE:
            logger.warning("job %s: could not record that its attempt ended", self.job_id)
