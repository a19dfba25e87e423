"""Runs a batch job: its request lines through the generation engine, a chunk at a time.

Each chunk's lines are decoded together, one engine per base model, a step at a time
(this runner owns the loop, see workers/generation/engine.py). The lines that finish
in a step (output lines or error lines) are stored after it, in a transaction fenced by
the attempt number (db/fencing.py), so only the attempt that holds the job writes and a
later attempt (after a worker crash) skips the lines already stored. Between chunks
the runner reports `request_counts`, notices a cancel, and checks the completion
window: once it has passed, the unfinished lines get `batch_expired` error lines and
the job ends `expired`, in one transaction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.datasets import load_dataset_rows
from core.enums import DatasetSchema, FailureType
from core.errors import BatchLineError, JobExpired, JobStopped, PermanentJobError
from core.settings import Settings
from core.specs import BatchSpec
from core.storage import artifact_store
from db.base import utcnow
from db.batch import expire_running, store_lines, stored_lines
from db.datasets import get_dataset
from db.jobs import get_job
from db.outputs import OutputRecord
from db.session import session_scope
from workers.batch.lines import (
    EXPIRED_CODE,
    EXPIRED_MESSAGE,
    generate_spec_for,
    stored_error,
    stored_output,
)
from workers.context import RunContext
from workers.failures import classify
from workers.generation.engine import GenerationEngine, base_of, open_engine
from workers.generation.requests import GenerationRequest, StepOutput
from workers.model_refs import inside
from workers.runners import RunResult

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


@dataclass
class RequestCounts:
    total: int
    completed: int = 0
    failed: int = 0

    @property
    def fraction(self) -> float:
        return (self.completed + self.failed) / self.total if self.total else 1.0

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed}


@dataclass(frozen=True)
class BatchInput:
    created_at: datetime
    requests: list[dict[str, Any]]


class BatchRunner:
    def __init__(
        self, settings: Settings, *, clock: Clock = utcnow, chunk_lines: int | None = None
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._chunk = chunk_lines or settings.batch_chunk_lines

    def run(self, raw_spec: dict[str, Any], ctx: RunContext) -> RunResult:
        spec = BatchSpec.model_validate(raw_spec)
        batch = self._load(ctx.job_id, spec)
        run = _BatchRun(self._settings, ctx, batch.requests)
        pending = run.resume()
        deadline = batch.created_at + spec.window
        for start in range(0, len(pending), self._chunk):
            ctx.check_stop()
            if self._clock() >= deadline:
                run.expire(spec.completion_window)
            run.run_chunk(pending[start : start + self._chunk])
        logger.info("batch %s done: %s", ctx.job_id, run.counts.as_dict())
        return RunResult(outputs=[], result={"request_counts": run.counts.as_dict()})

    def _load(self, job_id: str, spec: BatchSpec) -> BatchInput:
        with session_scope(self._settings.database_url, readonly=True) as session:
            job = get_job(session, job_id)
            if job is None:
                raise PermanentJobError(f"job {job_id} no longer exists", FailureType.INVALID_SPEC)
            ds = get_dataset(session, spec.input_dataset, job.tenant_id)
            if ds is None:
                raise PermanentJobError(
                    f"dataset {spec.input_dataset!r} no longer exists", FailureType.INVALID_SPEC
                )
            created_at, path, fmt, schema = job.created_at, ds.path, ds.format, ds.schema
        if schema != DatasetSchema.BATCH_REQUESTS.value:
            raise PermanentJobError(
                f"dataset {spec.input_dataset} holds {schema} rows, not batch requests",
                FailureType.INVALID_SPEC,
            )
        local = artifact_store(self._settings).fetch(inside(self._settings.data_dir, path))
        requests = load_dataset_rows(local, fmt)
        if any(r["url"] != spec.endpoint.value for r in requests):
            raise PermanentJobError(
                f"dataset {spec.input_dataset} does not call {spec.endpoint.value}",
                FailureType.INVALID_SPEC,
            )
        return BatchInput(created_at=created_at, requests=requests)


class _BatchRun:
    """One attempt at one batch: which lines are done, and storing each as it finishes."""

    def __init__(self, settings: Settings, ctx: RunContext, requests: list[dict[str, Any]]) -> None:
        self._settings = settings
        self._ctx = ctx
        self._requests = requests
        self._index = {r["custom_id"]: i for i, r in enumerate(requests)}
        self._done: set[int] = set()
        self._lock = threading.Lock()
        self.counts = RequestCounts(total=len(requests))

    def _report(self) -> None:
        self._ctx.report_progress(self.counts.fraction, request_counts=self.counts.as_dict())

    def resume(self) -> list[int]:
        """Count the lines an earlier attempt stored; the indexes still to run."""
        with session_scope(self._settings.database_url, readonly=True) as session:
            stored = stored_lines(session, self._ctx.job_id)
        self._done.update(stored)
        self.counts.failed = sum(stored.values())
        self.counts.completed = len(stored) - self.counts.failed
        if stored:
            logger.info(
                "batch %s: %d of %d lines stored by an earlier attempt",
                self._ctx.job_id,
                len(stored),
                self.counts.total,
            )
        self._report()
        return [i for i in range(len(self._requests)) if i not in stored]

    def _lease_lost(self) -> None:
        logger.warning(
            "batch %s: attempt %d (on %s) no longer holds the job",
            self._ctx.job_id,
            self._ctx.attempt,
            self._ctx.worker,
        )
        self._ctx.lease_lost = True
        self._ctx.stop_event.set()

    def _store(self, rows: list[OutputRecord]) -> None:
        """Store finished lines, fenced by the attempt; a stale attempt stops the run instead."""
        if not rows or self._ctx.lease_lost:
            return
        with session_scope(self._settings.database_url) as session:
            stored = store_lines(session, self._ctx.job_id, self._ctx.attempt, rows)
        if not stored:
            self._lease_lost()
            return
        with self._lock:
            for row in rows:
                self._done.add(row.prompt_index)
                if row.data is not None and row.data["error"] is not None:
                    self.counts.failed += 1
                else:
                    self.counts.completed += 1

    def run_chunk(self, indexes: list[int]) -> None:
        refused: list[OutputRecord] = []
        by_base: dict[str, list[GenerationRequest]] = {}
        for index in indexes:
            request = self._requests[index]
            custom_id = request["custom_id"]
            try:
                spec = generate_spec_for(request, self._settings.chat_default_max_tokens)
            except BatchLineError as exc:
                refused.append(stored_error(index, custom_id, exc.type, exc.message))
                continue
            try:
                base, _ = base_of(self._settings, spec.model)
            except PermanentJobError as exc:
                refused.append(self._error_line(custom_id, exc))
                continue
            by_base.setdefault(base, []).append(GenerationRequest(key=custom_id, spec=spec))
        self._store(refused)
        for base, requests in by_base.items():
            try:
                engine, _ = open_engine(self._settings, self._ctx.device, base)
            except PermanentJobError as exc:
                self._store([self._error_line(r.key, exc) for r in requests])
                continue
            try:
                self._decode(engine, requests)
            finally:
                engine.close()
        self._ctx.check_stop()
        self._report()

    def _decode(self, engine: GenerationEngine, requests: list[GenerationRequest]) -> None:
        """Step the engine until its lines are done, storing them after each step. On a stop
        flag the unfinished lines stay unstored (a later attempt runs them, or they expire)."""
        refused: list[OutputRecord] = []
        for request in requests:
            try:
                engine.add(request)
            except Exception as exc:
                refused.append(self._error_line(request.key, exc))
        self._store(refused)
        while engine.has_work and not self._ctx.stop_event.is_set():
            self._store(self._lines(engine.step()))

    def _lines(self, out: StepOutput) -> list[OutputRecord]:
        rows = [self._error_line(f.key, f.error) for f in out.failed]
        for finished in out.finished:
            index = self._index[finished.key]
            if not finished.texts:
                rows.append(
                    stored_error(
                        index,
                        finished.key,
                        FailureType.RUNTIME_ERROR.value,
                        "no text was generated",
                    )
                )
            else:
                rows.append(stored_output(index, self._requests[index], finished.texts))
        return rows

    def _error_line(self, custom_id: str, exc: BaseException) -> OutputRecord:
        """The error line of one request that failed alone, typed as a job failure would be."""
        error = classify(exc, self._settings, self._ctx.device)
        return stored_error(self._index[custom_id], custom_id, error.failure.value, error.message)

    def expire(self, window: str) -> None:
        """Give every unfinished line a batch_expired error and end the job expired."""
        with self._lock:
            left = [i for i in range(len(self._requests)) if i not in self._done]
            counts = RequestCounts(
                total=self.counts.total,
                completed=self.counts.completed,
                failed=self.counts.failed + len(left),
            )
        rows = [
            stored_error(i, self._requests[i]["custom_id"], EXPIRED_CODE, EXPIRED_MESSAGE)
            for i in left
        ]
        message = f"completion window {window} passed with {len(left)} lines unfinished"
        with session_scope(self._settings.database_url) as session:
            won = expire_running(
                session,
                self._ctx.job_id,
                self._ctx.attempt,
                rows,
                result={"request_counts": counts.as_dict()},
                message=message,
            )
        if not won:
            self._lease_lost()
            raise JobStopped(f"job {self._ctx.job_id} stopped: lease lost")
        self.counts = counts
        self._report()
        logger.info("batch %s expired: %s", self._ctx.job_id, message)
        raise JobExpired(message)
