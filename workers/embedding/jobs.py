"""Embedding jobs on a worker: a claimed job loads its encoder, ready embedding jobs on
the same model are claimed to join it, and the inputs of all of them are encoded together
in padded passes.

Each job keeps its own attempt (lease, heartbeat, stop flags, token stream, final state):
a job whose spec or inputs cannot be served, or that is cancelled between passes, ends
alone; an error in a pass ends the jobs that were still in it. Once a round is done the
worker looks for more ready jobs on the model it holds, until none is left or the join
window (`generation_join_window_s`, shared with decode groups) has passed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from core.embeddings import EMBEDDING_FINISH_REASON, EMBEDDING_KEY, vector_to_base64
from core.enums import FailureType, JobKind, JobStatus
from core.errors import PermanentJobError
from core.specs import EmbedSpec
from core.token_stream import TokenStreamWriter
from db.outputs import OutputRecord
from workers.generation.cache import CacheOutcome
from workers.generation.encoder import Encoder, get_encoder
from workers.model_refs import resolve_model
from workers.runners import Attempt, Claimer, RunResult

logger = logging.getLogger(__name__)
JOINED_MESSAGE = "joined a running embedding round"

Ending = Callable[[Attempt], JobStatus | None]


def serve_embeddings(claimer: Claimer, first: Attempt) -> None:
    """Serve a claimed embedding job and every ready one on its model; every attempt
    taken is ended before this returns."""
    EmbeddingBatchRun(claimer, first).run()


@dataclass(eq=False)
class _Member:
    """A job of the current round: its token ids, and the vectors as passes fill them."""

    attempt: Attempt
    ids: list[list[int]]
    vectors: list[str | None] = field(default_factory=list)
    passes: int = 0
    shared_passes: int = 0  # passes that also held another job's inputs

    @property
    def job_id(self) -> str:
        return self.attempt.claimed.ctx.job_id


class EmbeddingBatchRun:
    """The embedding jobs one worker serves on one encoder, round after round."""

    def __init__(self, claimer: Claimer, first: Attempt) -> None:
        self._claimer = claimer
        self._settings = claimer.settings
        self._first = first
        self._writer = TokenStreamWriter(self._settings.broker_url)
        self._opened = time.monotonic()

    def run(self) -> None:
        try:
            self._writer.begin(self._first.claimed.ctx.job_id, self._first.claimed.ctx.attempt)
            opened = self._open()
            if opened is None:
                return
            encoder, outcome = opened
            if self._settings.embedding_batch_wait_s > 0:
                time.sleep(self._settings.embedding_batch_wait_s)
            attempts = [self._first]
            cache: dict[str, Any] = {"model_cache": "hit" if outcome.hit else "miss"}
            if not outcome.hit:
                cache["load_s"] = round(outcome.load_s, 3)
            while True:
                attempts += self._take_more(self._settings.embedding_max_jobs - len(attempts))
                if not attempts:
                    return
                self._round(encoder, attempts, cache)
                attempts, cache = [], {"model_cache": "hit"}
                if time.monotonic() - self._opened > self._settings.generation_join_window_s:
                    return  # draining: later jobs wait for their own message
        finally:
            self._writer.close()

    def _open(self) -> tuple[Encoder, CacheOutcome] | None:
        claimed = self._first.claimed
        try:
            spec = _spec(claimed.spec)
            resolved = resolve_model(self._settings, spec.model, claimed.ctx.tenant_id)
            if resolved.adapter_of is not None:
                raise PermanentJobError(
                    f"model {spec.model!r} is an adapter; embeddings need a full encoder",
                    FailureType.INVALID_SPEC,
                )
            return get_encoder(resolved.ref, self._claimer.device)
        except Exception as exc:
            logger.info("job %s: its encoder could not be opened: %s", claimed.ctx.job_id, exc)
            self._finish(self._first, _failing(exc))
            return None

    def _take_more(self, room: int) -> list[Attempt]:
        """Claim ready embedding jobs on the same model, as many as there is room for."""
        model = self._first.claimed.model
        if model is None or room <= 0:
            return []
        try:
            taken = self._claimer.claim_ready(JobKind.EMBED, model, room, JOINED_MESSAGE)
        except SQLAlchemyError as exc:
            logger.warning("could not claim embedding jobs on %s: %s", model, exc)
            return []
        self._writer.begin_many([(a.claimed.ctx.job_id, a.claimed.ctx.attempt) for a in taken])
        return taken

    def _round(self, encoder: Encoder, attempts: list[Attempt], cache: dict[str, Any]) -> None:
        """Encode the inputs of `attempts` together, then end each job."""
        started = time.perf_counter()
        members: list[_Member] = []
        for attempt in attempts:
            try:
                members.append(_Member(attempt, _token_ids(encoder, _spec(attempt.claimed.spec))))
            except Exception as exc:
                self._finish(attempt, _failing(exc))
        if not members:
            return
        rows = [(m, i) for m in members for i in range(len(m.ids))]
        for m in members:
            m.vectors = [None] * len(m.ids)
        # longest first, so each pass pads to lengths close to its own
        rows.sort(key=lambda row: len(row[0].ids[row[1]]), reverse=True)
        size = self._settings.embedding_batch_size
        passes = [rows[start : start + size] for start in range(0, len(rows), size)]
        for number, chunk in enumerate(passes, start=1):
            live = [row for row in chunk if self._still_running(row[0], members)]
            if not live:
                continue
            try:
                vectors = encoder.encode([m.ids[i] for m, i in live])
            except Exception as exc:
                in_pass = {m.job_id: m for m, _ in live}
                logger.exception("embedding pass %d failed; ending jobs %s", number, list(in_pass))
                for member in in_pass.values():
                    members.remove(member)
                    self._finish(member.attempt, _failing(exc))
                continue
            in_pass = {m.job_id: m for m, _ in live}
            for (member, index), vector in zip(live, vectors.tolist(), strict=True):
                member.vectors[index] = vector_to_base64(vector)
            for member in in_pass.values():
                member.passes += 1
                member.shared_passes += len(in_pass) > 1
                done = sum(v is not None for v in member.vectors) / len(member.vectors)
                member.attempt.claimed.ctx.report_progress(done, passes=number)
        summary = {
            "jobs": len(members),
            "inputs": len(rows),
            "passes": len(passes),
            "embedding_s": round(time.perf_counter() - started, 3),
        }
        for member in list(members):
            if self._still_running(member, members):
                self._succeed(member, encoder, summary, cache)

    def _still_running(self, member: _Member, members: list[_Member]) -> bool:
        """False once the job left the round: ended here, or stopped (cancel, lease lost,
        time limit, shutdown), which this ends."""
        if member not in members:
            return False
        if member.attempt.claimed.ctx.stop_event.is_set():
            members.remove(member)
            self._finish(member.attempt, lambda a: a.stopped())
            return False
        return True

    def _succeed(
        self, member: _Member, encoder: Encoder, summary: dict[str, Any], cache: dict[str, Any]
    ) -> None:
        outputs = [
            OutputRecord(
                prompt_index=i,
                sequence_index=0,
                text="",
                finish_reason=EMBEDDING_FINISH_REASON,
                prompt_tokens=len(ids),
                completion_tokens=0,
                data={EMBEDDING_KEY: vector},
            )
            for i, (ids, vector) in enumerate(zip(member.ids, member.vectors, strict=True))
        ]
        tokens = sum(len(ids) for ids in member.ids)
        result = {
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "dimensions": encoder.width,
            "batch": {
                **summary,
                "job_passes": member.passes,
                "shared_passes": member.shared_passes,
            },
            **cache,
        }
        self._finish(member.attempt, lambda a: a.succeed(RunResult(outputs=outputs, result=result)))

    def _finish(self, attempt: Attempt, how: Ending) -> None:
        """End one attempt; a failure recording it stays with that job (its lease runs out
        and the reconciler takes it up). The token stream's end follows the commit."""
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


def _failing(exc: BaseException) -> Ending:
    return lambda attempt: attempt.failed(exc)


def _spec(raw: dict[str, Any]) -> EmbedSpec:
    try:
        return EmbedSpec.model_validate(raw)
    except ValidationError as exc:
        raise PermanentJobError(str(exc), FailureType.INVALID_SPEC) from exc


def _token_ids(encoder: Encoder, spec: EmbedSpec) -> list[list[int]]:
    """The ids to encode per input; PermanentJobError (invalid_spec, naming the input) for
    what the API could not check: a hub model's context, vocabulary and width."""
    if spec.dimensions is not None and spec.dimensions != encoder.width:
        raise PermanentJobError(
            f"model {spec.model!r} does not support dimensions: its embeddings have "
            f"{encoder.width} dimensions",
            FailureType.INVALID_SPEC,
        )
    given = spec.token_ids
    ids = given if given is not None else encoder.token_ids(spec.texts or [])
    vocab, limit = encoder.vocab_size, encoder.limit
    for i, row in enumerate(ids):
        if given is not None and any(t >= vocab for t in row):
            raise PermanentJobError(
                f"input[{i}] holds a token id past the vocabulary of model {spec.model!r} "
                f"({vocab} tokens)",
                FailureType.INVALID_SPEC,
            )
        if limit is not None and len(row) > limit:
            raise PermanentJobError(
                f"input[{i}] has {len(row)} tokens; model {spec.model!r} takes at most {limit}",
                FailureType.INVALID_SPEC,
            )
    return ids
