"""`GET /v1/jobs/{id}/stream`: a generation job's tokens as server-sent events.

Tokens come from the job's Redis stream (core.token_stream); the final status and,
for a job that had already finished, the texts come from the database. While it
waits the route re-reads the job's status now and then, so a job that ends without
an `end` entry (cancelled while queued, Redis flushed) still gets its `done` event.

Only the current attempt is shown: the follower starts from the attempt the database
names and moves on to any newer one the stream shows; entries of older attempts (a
stale worker that still writes after another took the job over) are skipped.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from redis import RedisError
from starlette.concurrency import run_in_threadpool

from api.deps import JobsRead, SettingsDep
from core.enums import JobKind, JobStatus
from core.errors import InvalidRequestError
from core.states import TERMINAL
from core.token_stream import StreamDelta, StreamEnd, StreamEntry, StreamStart, TokenStreamReader
from db import jobs as jobs_repo
from db import outputs as outputs_repo
from db.session import session_scope

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Module constants rather than settings: tests shorten them.
BLOCK_MS = 1000  # one XREAD waits this long for new entries
DB_CHECK_S = 3.0  # how often a waiting stream re-reads the job's status
KEEPALIVE_S = 14.0  # below FastAPI's own 15 s ping, which then only fires if a loop stalls
REDIS_RETRY_S = 1.0  # pause between reads while Redis is unreachable
_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")


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
class StoredText:
    prompt_index: int
    sequence_index: int
    text: str


@dataclass(frozen=True, slots=True)
class StreamOpening:
    """What the database says when a stream request arrives."""

    state: JobState
    outputs: list[StoredText]  # filled only when the job is already terminal


def _job_state(database_url: str, job_id: str) -> JobState | None:
    with session_scope(database_url, readonly=True) as session:
        job = jobs_repo.get_job(session, job_id)
        if job is None:
            return None
        return JobState(JobStatus(job.status), job.attempts, job.error_type, job.error_message)


def _open(database_url: str, job_id: str, tenant_id: str) -> StreamOpening:
    with session_scope(database_url, readonly=True) as session:
        job = jobs_repo.require_job(session, job_id, tenant_id=tenant_id)
        if job.kind != JobKind.GENERATE.value:
            raise InvalidRequestError(
                f"job {job_id} is a {job.kind} job; only generate jobs stream tokens",
                param="job_id",
            )
        state = JobState(JobStatus(job.status), job.attempts, job.error_type, job.error_message)
        outputs = (
            [
                StoredText(o.prompt_index, o.sequence_index, o.text)
                for o in outputs_repo.list_outputs(session, job_id)
            ]
            if state.terminal
            else []
        )
        return StreamOpening(state, outputs)


async def open_stream(job_id: str, settings: SettingsDep, who: JobsRead) -> StreamOpening:
    """Runs before the response starts, so an unknown or wrong job gets a typed error."""
    return await run_in_threadpool(_open, settings.database_url, job_id, who.tenant_id)


async def get_token_reader(request: Request) -> TokenStreamReader:
    reader: TokenStreamReader = request.app.state.token_reader
    return reader


StreamOpeningDep = Annotated[StreamOpening, Depends(open_stream)]
TokenReaderDep = Annotated[TokenStreamReader, Depends(get_token_reader)]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)]


def token_event(
    prompt_index: int, sequence_index: int, text: str, entry_id: str | None = None
) -> ServerSentEvent:
    data = {"prompt_index": prompt_index, "sequence_index": sequence_index, "text": text}
    return ServerSentEvent(event="token", data=data, id=entry_id)


def restart_event(attempt: int) -> ServerSentEvent:
    return ServerSentEvent(event="restart", data={"attempt": attempt})


def done_event(state: JobState) -> ServerSentEvent:
    data: dict[str, Any] = {
        "status": state.status.value,
        "error_type": state.error_type,
        "error_message": state.error_message,
    }
    return ServerSentEvent(event="done", data=data)


@router.get("/{job_id}/stream", response_class=EventSourceResponse)
async def stream_job_tokens(
    job_id: str,
    opening: StreamOpeningDep,
    settings: SettingsDep,
    reader: TokenReaderDep,
    last_event_id: LastEventId = None,
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: `token`*, `restart` when a retried attempt starts over, `done`.

    A client that reconnects with `Last-Event-ID` continues after that entry.
    """
    resume = last_event_id if last_event_id and _ENTRY_ID.fullmatch(last_event_id) else None
    if opening.state.terminal:
        if resume is not None:  # the client holds partial text; the stored one replaces it
            yield restart_event(opening.state.attempts)
        for out in opening.outputs:
            yield token_event(out.prompt_index, out.sequence_index, out.text)
        yield done_event(opening.state)
        return
    follower = _Follower(reader, settings.database_url, job_id, resume, opening.state.attempts)
    async for event in follower.run():
        yield event


class _Follower:
    """Follows one job's token stream until its end entry or its terminal status."""

    def __init__(
        self,
        reader: TokenStreamReader,
        database_url: str,
        job_id: str,
        after: str | None,
        attempt: int,
    ) -> None:
        self.reader = reader
        self.database_url = database_url
        self.job_id = job_id
        self.last_id = after or "0"
        # A resuming client holds text already: a new attempt must tell it to drop that.
        self.sent_text = after is not None
        self.attempt = attempt  # the newest attempt known; older ones' entries are skipped
        self.redis_ok = True

    async def run(self) -> AsyncIterator[ServerSentEvent]:
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
            if now - last_sent >= KEEPALIVE_S:
                yield ServerSentEvent(comment="keepalive")
                last_sent = now

    async def _finish(self, state: JobState | None) -> AsyncIterator[ServerSentEvent]:
        """The job ended in the database: send what the stream still holds, then `done`."""
        ended = False
        while not ended and (entries := await self._read(None)):
            for entry in entries:
                if isinstance(entry, StreamEnd) and entry.attempt >= self.attempt:
                    ended = True
                    break
                for event in self._events(entry):
                    yield event
        if state is None:
            logger.warning("job %s disappeared while its tokens were streamed", self.job_id)
            return
        yield done_event(state)

    def _events(self, entry: StreamEntry) -> list[ServerSentEvent]:
        """What the client gets for one entry of the current (or a newer) attempt."""
        self.last_id = entry.entry_id
        if isinstance(entry, StreamEnd) or entry.attempt < self.attempt:
            return []
        events: list[ServerSentEvent] = []
        if entry.attempt > self.attempt or isinstance(entry, StreamStart):
            # a newer attempt starts over (its start entry may have been trimmed)
            self.attempt = entry.attempt
            if self.sent_text:
                self.sent_text = False
                events.append(restart_event(entry.attempt))
        if isinstance(entry, StreamDelta):
            self.sent_text = True
            events.append(
                token_event(entry.prompt_index, entry.sequence_index, entry.text, entry.entry_id)
            )
        return events

    async def _read(self, block_ms: int | None) -> list[StreamEntry]:
        try:
            entries = await self.reader.read(self.job_id, self.last_id, block_ms=block_ms)
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
        return await run_in_threadpool(_job_state, self.database_url, self.job_id)
