"""Following a generation job as it runs: its token stream, then its final status.

Tokens come from the job's Redis stream (core.token_stream); the final status comes
from the database. While it waits the follower re-reads the job's status now and then,
so a job that ends without an `end` entry (cancelled while queued, Redis flushed) still
ends the follow.

Only the current attempt is followed: the follower starts from the attempt the database
names and moves on to any newer one the stream shows; entries of older attempts (a stale
worker that still writes after another took the job over) are skipped.

What a follow yields is typed (`Token`, `Restart`, `Requeued`, `Quiet`, `Done`), so each
route puts it in its own wire format: our job stream as `token`/`restart`/`done` events,
the OpenAI-compatible routes as completion chunks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio
from redis import RedisError
from starlette.concurrency import run_in_threadpool

from core.enums import FailureType, JobStatus
from core.errors import (
    BadRequestError,
    JobCancelledError,
    JobFailedError,
    ModelNotFoundError,
    ModelyardError,
)
from core.states import TERMINAL
from core.token_stream import (
    StreamDelta,
    StreamEnd,
    StreamEntry,
    StreamStart,
    StreamSubscription,
    TokenStreamReader,
)
from db import jobs as jobs_repo
from db.session import session_scope

logger = logging.getLogger(__name__)

# Module constants rather than settings: tests shorten them.
BLOCK_MS = 1000  # one XREAD waits this long for new entries
DB_CHECK_S = 3.0  # how often a waiting follow re-reads the job's status
KEEPALIVE_S = 14.0  # below FastAPI's own 15 s ping, which then only fires if a loop stalls
REDIS_RETRY_S = 1.0  # pause between reads while Redis is unreachable


@dataclass(frozen=True, slots=True)
class JobState:
    status: JobStatus
    attempts: int
    error_type: str | None
    error_message: str | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True, slots=True)
class Token:
    """Text added to one (prompt, sequence) by the current attempt."""

    prompt_index: int
    sequence_index: int
    text: str
    entry_id: str
    logprobs: list[dict[str, Any]] | None = None  # entries of the tokens this text completes


@dataclass(frozen=True, slots=True)
class Restart:
    """A newer attempt starts over: text already given out is not part of the answer."""

    attempt: int


@dataclass(frozen=True, slots=True)
class Requeued:
    """The database shows the job queued again after its current attempt gave out text
    (its worker was lost); a newer attempt will start over."""

    state: JobState


@dataclass(frozen=True, slots=True)
class Quiet:
    """Nothing was given out for KEEPALIVE_S: a chance to keep the connection alive."""


@dataclass(frozen=True, slots=True)
class Done:
    """The job's final status (None when the job disappeared while it was followed)."""

    state: JobState | None


FollowEvent = Token | Restart | Requeued | Quiet | Done


def ending_error(job_id: str, state: JobState | None, input_param: str | None) -> ModelyardError:
    """The error an OpenAI-shaped request answers for its job's end other than success: a
    model the worker could not find is a 404 naming `model`, a spec the worker refused a
    400 naming `input_param` (the body field the job's input came from), a cancelled or
    expired job a cancellation, anything else the job's failure."""
    if state is None:
        return JobFailedError(f"job {job_id} disappeared before it answered")
    if state.status in (JobStatus.CANCELLED, JobStatus.EXPIRED):
        return JobCancelledError(f"job {job_id} ended {state.status.value} before it answered")
    message = state.error_message or "the job failed"
    if state.error_type == FailureType.MODEL_NOT_FOUND.value:
        return ModelNotFoundError(message, param="model")
    if state.error_type == FailureType.INVALID_SPEC.value:
        return BadRequestError(message, param=input_param)
    return JobFailedError(f"job {job_id} {state.status.value} ({state.error_type}): {message}")


def job_state(database_url: str, job_id: str) -> JobState | None:
    with session_scope(database_url, readonly=True) as session:
        job = jobs_repo.get_job(session, job_id)
        if job is None:
            return None
        return JobState(JobStatus(job.status), job.attempts, job.error_type, job.error_message)


class Follower:
    """Follows one job's token stream until its end entry or its terminal status; `run`
    ends with one `Done`."""

    def __init__(
        self,
        reader: TokenStreamReader,
        database_url: str,
        job_id: str,
        attempt: int,
        after: str | None = None,
        *,
        tokens: bool = True,
    ) -> None:
        """`after`: the entry id a resuming client holds text up to. `tokens=False` follows
        the job to its end without giving out its tokens."""
        self.reader = reader
        self.database_url = database_url
        self.job_id = job_id
        self.last_id = after or "0"
        self.tokens = tokens
        # A resuming client holds text already: a new attempt must tell it to drop that.
        self.sent_text = after is not None
        self.attempt = attempt  # the newest attempt known; older ones' entries are skipped
        self.redis_ok = True
        self._requeued_told = 0  # the attempt a Requeued was last given for
        self._subscription: StreamSubscription | None = None

    async def run(self) -> AsyncIterator[FollowEvent]:
        # the blocking reads go through the reader's shared XREAD (core.token_stream)
        self._subscription = self.reader.subscribe(self.job_id, self.last_id)
        try:
            async with aclosing(self._follow()) as events:
                async for event in events:
                    yield event
        finally:
            self._subscription.close()
            self._subscription = None

    async def _follow(self) -> AsyncGenerator[FollowEvent, None]:
        next_check = time.monotonic() + DB_CHECK_S
        last_sent = time.monotonic()
        while True:
            entries = await self._read(BLOCK_MS)
            for entry in entries:
                if isinstance(entry, StreamEnd):
                    self.last_id = entry.entry_id
                    if entry.attempt < self.attempt:
                        continue  # a stale attempt's end
                    state = await self._state()
                    if state is None or state.terminal:
                        async for final in self._finish(state):
                            yield final
                        return
                    logger.warning(
                        "job %s: token stream ended (%s) but the job is %s; still waiting",
                        self.job_id,
                        entry.status,
                        state.status.value,
                    )
                    continue
                for event in self._events(entry):
                    yield event
                    last_sent = time.monotonic()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + DB_CHECK_S
                state = await self._state()
                if state is None or state.terminal:
                    async for final in self._finish(state):
                        yield final
                    return
                if self._lost(state):
                    self._requeued_told = self.attempt
                    yield Requeued(state)
            if now - last_sent >= KEEPALIVE_S:
                yield Quiet()
                last_sent = now

    def _lost(self, state: JobState) -> bool:
        return (
            self.sent_text
            and state.status is JobStatus.QUEUED
            and self._requeued_told != self.attempt
        )

    async def _finish(self, state: JobState | None) -> AsyncIterator[FollowEvent]:
        """The job ended in the database: give out what the stream still holds, then Done."""
        ended = False
        while not ended and (entries := await self._read(None)):
            for entry in entries:
                if isinstance(entry, StreamEnd) and entry.attempt >= self.attempt:
                    ended = True
                    break
                for event in self._events(entry):
                    yield event
        if state is None:
            logger.warning("job %s disappeared while it was followed", self.job_id)
        yield Done(state)

    def _events(self, entry: StreamEntry) -> list[FollowEvent]:
        """What one entry of the current (or a newer) attempt gives out."""
        self.last_id = entry.entry_id
        if isinstance(entry, StreamEnd) or entry.attempt < self.attempt:
            return []
        events: list[FollowEvent] = []
        if entry.attempt > self.attempt or isinstance(entry, StreamStart):
            # a newer attempt starts over (its start entry may have been trimmed)
            self.attempt = entry.attempt
            if self.sent_text:
                self.sent_text = False
                events.append(Restart(entry.attempt))
        if isinstance(entry, StreamDelta) and self.tokens:
            self.sent_text = True
            events.append(
                Token(
                    entry.prompt_index,
                    entry.sequence_index,
                    entry.text,
                    entry.entry_id,
                    entry.logprobs,
                )
            )
        return events

    async def _read(self, block_ms: int | None) -> list[StreamEntry]:
        try:
            if block_ms is None or self._subscription is None:
                entries = await self.reader.read(self.job_id, self.last_id, block_ms=block_ms)
            else:
                entries = await self._subscription.read(self.last_id, block_ms)
        except RedisError as exc:
            if self.redis_ok:
                logger.warning(
                    "job %s: token stream unreadable (%s: %s); watching the database only",
                    self.job_id,
                    type(exc).__name__,
                    exc,
                )
            self.redis_ok = False
            if block_ms is not None:
                await anyio.sleep(REDIS_RETRY_S)
            return []
        if not self.redis_ok:
            logger.info("job %s: token stream readable again", self.job_id)
            self.redis_ok = True
        return entries

    async def _state(self) -> JobState | None:
        return await run_in_threadpool(job_state, self.database_url, self.job_id)


class ClientDisconnected(Exception):
    """The client went away while its request waited for the job."""


DISCONNECT_POLL_S = 0.25


async def follow_to_end(
    follower: Follower,
    disconnected: Callable[[], Awaitable[bool]],
    on_event: Callable[[FollowEvent], None] | None = None,
) -> JobState | None:
    """The job's final state once it ends (every event before it handed to `on_event`);
    ClientDisconnected as soon as `disconnected()` says the client is gone (the caller
    decides what becomes of the job)."""
    final: list[JobState | None] = []

    async def follow(scope: anyio.CancelScope) -> None:
        async for event in follower.run():
            if isinstance(event, Done):
                final.append(event.state)
            elif on_event is not None:
                on_event(event)
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(follow, group.cancel_scope)
        while not await disconnected():
            await anyio.sleep(DISCONNECT_POLL_S)
        group.cancel_scope.cancel()
    if not final:
        raise ClientDisconnected(follower.job_id)
    return final[0]
