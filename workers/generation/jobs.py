"""Generation jobs on a worker: one claimed job opens a decode group on its base model,
and ready jobs on the same model are claimed to join it, at the start and between steps.

This module owns the loop around the engine. Between two steps it publishes the token
deltas, ends the jobs that finished or failed (each through its own `Attempt`, so each
job goes through the one lifecycle: its lease, heartbeat, stop flags, token stream and
final state are its own), takes in more jobs through the `Claimer`, and honours stop
flags. One job's failure (a bad adapter, an out-of-memory, a database error while
recording it) ends that job alone; the others go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from core import cancel_notices
from core.enums import EventType, FailureType, JobKind, JobStatus
from core.errors import PermanentJobError
from core.settings import Settings
from core.specs import GenerateSpec
from core.token_stream import TokenDelta, TokenStreamWriter
from db.events import append_event
from db.outputs import storable_text, without_text
from db.session import session_scope
from workers.generation.cache import CacheOutcome
from workers.generation.engine import GenerationEngine, base_of, open_engine
from workers.generation.requests import FinishedRequest, GenerationRequest, StepOutput
from workers.generation.retrieval import with_retrieval
from workers.runners import Attempt, Claimer, RunResult

logger = logging.getLogger(__name__)

JOINED_MESSAGE = "joined a running decode group"


class CancelNotices:
    """Reads the cancel notices (core.cancel_notices) of a decode group's jobs, at most
    every `generation_poll_s`; when Redis does not answer, it waits a while and the
    heartbeat's reading of the database stays the way cancels arrive."""

    PAUSE_AFTER_ERROR_S = 5.0

    def __init__(self, settings: Settings) -> None:
        self._client: redis.Redis = redis.Redis.from_url(
            settings.broker_url, socket_connect_timeout=2, socket_timeout=2
        )
        self._every_s = settings.generation_poll_s
        self._next = 0.0

    def cancelled(self, job_ids: list[str]) -> set[str]:
        now = time.monotonic()
        if not job_ids or now < self._next:
            return set()
        self._next = now + self._every_s
        try:
            return cancel_notices.noticed(self._client, job_ids)
        except redis.RedisError as exc:
            self._next = now + self.PAUSE_AFTER_ERROR_S
            logger.warning("cancel notices unreadable (%s); the heartbeat reads cancels", exc)
            return set()

    def close(self) -> None:
        self._client.close()


def serve_generation(claimer: Claimer, first: Attempt) -> None:
    """Serve a claimed generation job, and every ready job that can join its decode group,
    until none is left. Every attempt taken is ended before this returns."""
    DecodeGroupRun(claimer, first).run()


Ending = Callable[[Attempt], JobStatus | None]


def failing(exc: BaseException) -> Ending:
    """End an attempt after `exc`: classified by the lifecycle (retried or failed)."""
    return lambda attempt: attempt.failed(exc)


@dataclass
class _Member:
    """A job decoding in the group."""

    attempt: Attempt
    started: float
    cache_note: dict[str, Any]

    @property
    def job_id(self) -> str:
        return self.attempt.claimed.ctx.job_id


class DecodeGroupRun:
    """One decode group on one worker, from its first job until it drains."""

    def __init__(self, claimer: Claimer, first: Attempt) -> None:
        self._claimer = claimer
        self._settings = claimer.settings
        self._first = first
        self._writer = TokenStreamWriter(self._settings.broker_url)
        self._notices = CancelNotices(self._settings)
        self._members: dict[str, _Member] = {}
        self._cache_note: dict[str, Any] = {}
        self._opened = time.monotonic()
        self._last_poll = 0.0

    def run(self) -> None:
        try:
            engine = self._open()
            if engine is None:
                return
            try:
                self._loop(engine)
            except Exception as exc:
                # not one request's failure (those come back in a step's output): the group
                # itself broke, so every job still in it ends with this error
                logger.exception("decode group on %s failed", engine.base)
                for job_id in list(self._members):
                    self._end(job_id, failing(exc))
            finally:
                engine.close()
        finally:
            self._writer.close()
            self._notices.close()

    def _open(self) -> GenerationEngine | None:
        first = self._first
        job_id = first.claimed.ctx.job_id
        try:
            spec = self._prepared(first)
            base, _ = base_of(self._settings, spec.model)
            engine, outcome = open_engine(self._settings, self._claimer.device, base)
        except Exception as exc:
            logger.info("job %s: its model could not be opened: %s", job_id, exc)
            self._finish_alone(first, failing(exc))
            return None
        self._note_cache(job_id, base, outcome)
        self._writer.begin(job_id, first.claimed.ctx.attempt)
        if not self._start(engine, first, spec):
            return None
        if self._settings.generation_group_wait_s > 0:
            time.sleep(self._settings.generation_group_wait_s)
        return engine

    def _loop(self, engine: GenerationEngine) -> None:
        model = self._first.claimed.model
        while True:
            self._drop_stopped(engine)
            self._take_more(engine, model)
            if not engine.has_work:
                return
            self._record_step(engine.step())

    def _record_step(self, out: StepOutput) -> None:
        if out.deltas:
            deltas = []
            for d in out.deltas:
                member = self._members.get(d.key)
                if member is None:
                    continue
                # the same character swap as the stored text, so the stream adds up to it
                deltas.append(
                    TokenDelta(
                        d.key,
                        member.attempt.claimed.ctx.attempt,
                        d.prompt_index,
                        d.sequence_index,
                        storable_text(d.text),
                        d.logprobs,
                    )
                )
            self._writer.publish(deltas)
        for p in out.progress:
            member = self._members.get(p.key)
            if member is not None:
                member.attempt.claimed.ctx.report_progress(p.fraction, **p.detail())
        for finished in out.finished:
            self._succeed(finished)
        for failed in out.failed:
            self._end(failed.key, failing(failed.error))

    def _succeed(self, finished: FinishedRequest) -> None:
        member = self._members.get(finished.key)
        if member is None:
            return
        summary = {
            "usage": {
                "prompt_tokens": sum(t.prompt_tokens for t in finished.texts),
                "completion_tokens": sum(t.completion_tokens for t in finished.texts),
            },
            "generation_s": round(time.perf_counter() - member.started, 3),
            **member.cache_note,
        }
        texts = finished.texts
        if not member.attempt.claimed.spec.get("store_text", True):
            texts = [without_text(t) for t in texts]  # readers had it from the token stream
        result = RunResult(outputs=texts, result=summary)
        self._end(finished.key, lambda a: a.succeed(result))

    def _drop_stopped(self, engine: GenerationEngine) -> None:
        for job_id in self._notices.cancelled(list(self._members)):
            ctx = self._members[job_id].attempt.claimed.ctx
            if not ctx.cancelled:
                logger.info("job %s: cancel noticed between decoding steps", job_id)
                ctx.cancelled = True
                ctx.stop_event.set()
        for job_id, member in list(self._members.items()):
            if member.attempt.claimed.ctx.stop_event.is_set():
                engine.cancel(job_id)
                self._end(job_id, lambda a: a.stopped())

    def _end(self, job_id: str, how: Ending) -> None:
        member = self._members.pop(job_id, None)
        if member is not None:
            self._finish_alone(member.attempt, how)

    def _finish_alone(self, attempt: Attempt, how: Ending) -> None:
        """End one attempt; whatever goes wrong recording it stays with that job (its lease
        then runs out and the reconciler runs it again)."""
        ctx = attempt.claimed.ctx
        try:
            status = how(attempt)
        except Exception:
            logger.exception(
                "job %s: recording the end of attempt %d failed; the reconciler takes it up "
                "once its lease expires",
                ctx.job_id,
                ctx.attempt,
            )
            return
        if status is not None:
            self._writer.end(ctx.job_id, ctx.attempt, status.value)

    def _start(self, engine: GenerationEngine, attempt: Attempt, spec: GenerateSpec) -> bool:
        """Add a claimed job's request to the engine (its token stream begun); False when it
        failed (and was ended)."""
        ctx = attempt.claimed.ctx
        note = dict(self._cache_note) if not self._members else {"model_cache": "hit"}
        try:
            engine.add(GenerationRequest(key=ctx.job_id, spec=spec, stream=True))
        except Exception as exc:
            logger.info("job %s: its request was refused: %s", ctx.job_id, exc)
            self._finish_alone(attempt, failing(exc))
            return False
        self._members[ctx.job_id] = _Member(attempt, time.perf_counter(), note)
        return True

    def _take_more(self, engine: GenerationEngine, model: str | None) -> None:
        """Claim ready jobs on the same base model while the group has room."""
        room = engine.room
        if model is None or room <= 0:
            return
        now = time.monotonic()
        if now - self._opened > self._settings.generation_join_window_s:
            return  # draining: later jobs wait for their own message
        if engine.has_work and now - self._last_poll < self._settings.generation_poll_s:
            return
        self._last_poll = now
        try:
            attempts = self._claimer.claim_ready(JobKind.GENERATE, model, room, JOINED_MESSAGE)
        except SQLAlchemyError as exc:
            logger.warning("could not claim jobs to join the decode group on %s: %s", model, exc)
            return
        joining: list[tuple[Attempt, GenerateSpec]] = []
        for attempt in attempts:
            try:
                joining.append((attempt, self._prepared(attempt)))
            except Exception as exc:
                self._finish_alone(attempt, failing(exc))
        self._writer.begin_many([(a.claimed.ctx.job_id, a.claimed.ctx.attempt) for a, _ in joining])
        for attempt, spec in joining:
            self._start(engine, attempt, spec)

    def _prepared(self, attempt: Attempt) -> GenerateSpec:
        """The spec to decode: with retrieval, the past answers put into its messages."""
        claimed = attempt.claimed
        try:
            spec = GenerateSpec.model_validate(claimed.spec)
        except ValidationError as exc:
            raise PermanentJobError(str(exc), FailureType.INVALID_SPEC) from exc
        if spec.retrieval is None:
            return spec
        augmented, found = with_retrieval(
            self._settings, spec, claimed.ctx.tenant_id, self._claimer.device
        )
        self._record(
            claimed.ctx.job_id, f"retrieved {spec.retrieval.k} past answers per question", found
        )
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

    def _record(self, job_id: str, message: str, data: dict[str, Any]) -> None:
        try:
            with session_scope(self._settings.database_url) as session:
                append_event(session, job_id, EventType.LOG, message, data)
        except SQLAlchemyError as exc:
            logger.warning("job %s: could not record %r: %s", job_id, message, exc)
