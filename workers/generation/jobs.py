"""Generation jobs on a worker: one claimed job opens a decoding batch, and ready jobs
for the same base model are claimed (with the usual compare-and-set) to join it,
at the start and between decoding steps. Each job keeps its own lease, heartbeat,
cancel flag, token stream and final state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import OperationalError

from core.enums import EventType, FailureType, JobKind, JobStatus
from core.errors import PermanentJobError
from core.specs import GenerateSpec
from core.token_stream import TokenDelta, TokenStreamWriter
from db.base import utcnow
from db.events import append_event
from db.jobs import ready_for_model
from db.outputs import storable_text
from db.session import session_scope
from workers.generation.cache import CacheOutcome
from workers.generation.engine import GenerationEngine, engine_for
from workers.generation.requests import GenerationRequest, RequestResult
from workers.generation.retrieval import with_retrieval
from workers.runners import Attempt, ClaimedJob, Claimer, RunResult

logger = logging.getLogger(__name__)


@dataclass
class _Running:
    attempt: Attempt
    spec: GenerateSpec
    started: float
    cache_note: dict[str, Any]


def serve_generation(claimer: Claimer, first: Attempt) -> None:
    """Serve a claimed generation job and every ready job that can join its decode group."""
    GenerationBatchRun(claimer, first).run()


class GenerationBatchRun:
    """Serves one claimed generation job and every ready job that can join its batch."""

    def __init__(self, claimer: Claimer, first: Attempt) -> None:
        self._claimer = claimer
        self._settings = claimer.settings
        self._first = first
        self._engine: GenerationEngine = engine_for(self._settings, claimer.device)
        self._writer = TokenStreamWriter(self._settings.broker_url)
        self._running: dict[str, _Running] = {}
        self._deltas: list[TokenDelta] = []
        self._cache_note: dict[str, Any] = {}
        self._opened = time.monotonic()

    def run(self) -> None:
        first_attempt = self._first
        first = first_attempt.claimed
        try:
            spec = self._prepared(first, GenerateSpec.model_validate(first.spec))
            base, _ = self._engine.base_of(spec.model)
            entry, outcome = self._engine.load(base)
        except PermanentJobError as exc:
            first_attempt.fail(exc.failure, exc.message)
            self._writer.end(first.ctx.job_id, JobStatus.FAILED.value)
            return
        except Exception as exc:
            logger.exception("job %s: loading its model failed", first.ctx.job_id)
            first_attempt.failed(exc)
            return
        self._note_cache(first.ctx.job_id, base, outcome)
        first_request = self._start(first_attempt, spec)
        if self._settings.generation_batch_wait_s > 0:
            time.sleep(self._settings.generation_batch_wait_s)
        try:
            self._engine.run(
                entry,
                [first_request],
                self._finished,
                more=lambda room: self._join(first.model, room),
                after_step=self._flush,
            )
        except Exception as exc:
            logger.exception("generation batch on %s failed", base)
            for job_id in list(self._running):
                self._end(
                    job_id,
                    RequestResult(
                        job_id,
                        [],
                        error=f"{type(exc).__name__}: {exc}",
                        error_type=FailureType.RUNTIME_ERROR.value,
                    ),
                )
        finally:
            self._flush()
            self._writer.close()

    def _prepared(self, claimed: ClaimedJob, spec: GenerateSpec) -> GenerateSpec:
        """The spec to decode: with retrieval, the past answers put into its messages."""
        if spec.retrieval is None:
            return spec
        job_id = claimed.ctx.job_id
        try:
            augmented, found = with_retrieval(
                self._settings, spec, claimed.ctx.tenant_id, self._claimer.device
            )
        except (OSError, RuntimeError) as exc:
            logger.exception("job %s: retrieval failed", job_id)
            raise PermanentJobError(
                f"retrieval failed: {type(exc).__name__}: {exc}", FailureType.RUNTIME_ERROR
            ) from exc
        self._record(job_id, f"retrieved {spec.retrieval.k} past answers per question", found)
        return augmented

    def _note_cache(self, job_id: str, base: str, outcome: CacheOutcome) -> None:
        self._cache_note = {"model_cache": "hit" if outcome.hit else "miss"}
        data: dict[str, Any] = {"model": base, **self._cache_note}
        message = f"model {base} from the worker's cache"
        if not outcome.hit:
            data["load_s"] = round(outcome.load_s, 3)
            message = f"model {base} loaded in {outcome.load_s:.2f}s"
        if outcome.evicted:
            data["evicted"] = list(outcome.evicted)
            message += f"; evicted {', '.join(outcome.evicted)}"
        self._record(job_id, message, data)
        self._cache_note["load_s"] = round(outcome.load_s, 3)

    def _start(self, attempt: Attempt, spec: GenerateSpec) -> GenerationRequest:
        claimed = attempt.claimed
        job_id = claimed.ctx.job_id
        note = dict(self._cache_note) if not self._running else {"model_cache": "hit"}
        self._running[job_id] = _Running(attempt, spec, time.perf_counter(), note)
        self._writer.begin(job_id, claimed.ctx.attempt)
        ctx = claimed.ctx

        def on_delta(prompt_index: int, sequence_index: int, text: str) -> None:
            # the same character swap as the stored text, so the stream adds up to it
            self._deltas.append(
                TokenDelta(job_id, prompt_index, sequence_index, storable_text(text))
            )

        def on_progress(fraction: float, detail: dict[str, int]) -> None:
            ctx.report_progress(fraction, **detail)

        return GenerationRequest(
            key=job_id,
            spec=spec,
            stop_event=ctx.stop_event,
            on_delta=on_delta,
            on_progress=on_progress,
        )

    def _join(self, model: str | None, room: int) -> list[GenerationRequest]:
        """Claim up to `room` ready jobs on the same base model."""
        if model is None or room <= 0:
            return []
        if time.monotonic() - self._opened > self._settings.generation_join_window_s:
            return []  # draining: later jobs wait for their own message
        try:
            with session_scope(self._settings.database_url, readonly=True) as session:
                ids = list(ready_for_model(session, JobKind.GENERATE, model, utcnow(), room))
        except OperationalError:
            logger.warning("could not look for jobs to join the batch on %s", model)
            return []
        joined: list[GenerationRequest] = []
        for job_id in ids:
            try:
                attempt = self._claimer.claim_and_begin(job_id)
            except OperationalError:
                logger.warning("job %s: claim failed; it stays queued", job_id)
                continue
            if attempt is None:
                continue
            try:
                spec = self._prepared(
                    attempt.claimed, GenerateSpec.model_validate(attempt.claimed.spec)
                )
            except ValueError as exc:
                attempt.fail(FailureType.INVALID_SPEC, str(exc))
                continue
            except PermanentJobError as exc:
                attempt.fail(exc.failure, exc.message)
                continue
            joined.append(self._start(attempt, spec))
            self._record(job_id, "joined a running batch", {"worker": self._claimer.worker})
        return joined

    def _record(self, job_id: str, message: str, data: dict[str, Any]) -> None:
        try:
            with session_scope(self._settings.database_url) as session:
                append_event(session, job_id, EventType.LOG, message, data)
        except OperationalError:
            logger.warning("job %s: could not record %r", job_id, message)

    def _flush(self) -> None:
        if self._deltas:
            self._writer.publish(self._deltas)
            self._deltas = []

    def _finished(self, result: RequestResult) -> None:
        self._flush()
        self._end(result.key, result)

    def _end(self, job_id: str, result: RequestResult) -> None:
        running = self._running.pop(job_id, None)
        if running is None:
            return
        attempt = running.attempt
        if result.stopped:
            status = attempt.stopped()
        elif result.error is not None:
            failure = FailureType(result.error_type or FailureType.RUNTIME_ERROR.value)
            status = attempt.fail(failure, result.error)
        else:
            summary = {
                "usage": {
                    "prompt_tokens": sum(t.prompt_tokens for t in result.texts),
                    "completion_tokens": sum(t.completion_tokens for t in result.texts),
                },
                "generation_s": round(time.perf_counter() - running.started, 3),
                **running.cache_note,
            }
            status = attempt.succeed(RunResult(outputs=result.texts, result=summary))
        if status is not None:
            self._writer.end(job_id, status.value)
