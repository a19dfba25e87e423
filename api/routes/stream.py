"""`GET /v1/jobs/{id}/stream`: a generation job's tokens as server-sent events.

The tokens and the final status come from following the job (api.job_follow); for a
job that had already finished, the texts come from the database.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.deps import JobsRead, SettingsDep, TokenReaderDep
from api.job_follow import Done, Follower, JobState, Quiet, Restart, Token
from core.completions import LOGPROBS
from core.enums import JobKind, JobStatus
from core.errors import InvalidRequestError
from db import jobs as jobs_repo
from db import outputs as outputs_repo
from db.session import session_scope

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")


@dataclass(frozen=True, slots=True)
class StoredText:
    prompt_index: int
    sequence_index: int
    text: str
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class StreamOpening:
    """What the database says when a stream request arrives."""

    state: JobState
    outputs: list[StoredText]  # filled only when the job is already terminal


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
                StoredText(o.prompt_index, o.sequence_index, o.text, (o.data or {}).get(LOGPROBS))
                for o in outputs_repo.list_outputs(session, job_id)
            ]
            if state.terminal
            else []
        )
        return StreamOpening(state, outputs)


async def open_stream(job_id: str, settings: SettingsDep, who: JobsRead) -> StreamOpening:
    """Runs before the response starts, so an unknown or wrong job gets a typed error."""
    return await run_in_threadpool(_open, settings.database_url, job_id, who.tenant_id)


StreamOpeningDep = Annotated[StreamOpening, Depends(open_stream)]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)]


def token_event(
    prompt_index: int,
    sequence_index: int,
    text: str,
    entry_id: str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> ServerSentEvent:
    """A `token` event; `logprobs` (where the job asked) are the entries of the tokens it
    completes, in OpenAI's chat shape."""
    data: dict[str, Any] = {
        "prompt_index": prompt_index,
        "sequence_index": sequence_index,
        "text": text,
    }
    if logprobs is not None:
        data["logprobs"] = logprobs
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
            yield token_event(out.prompt_index, out.sequence_index, out.text, None, out.logprobs)
        yield done_event(opening.state)
        return
    follower = Follower(reader, settings.database_url, job_id, opening.state.attempts, resume)
    async for event in follower.run():
        if isinstance(event, Token):
            yield token_event(
                event.prompt_index, event.sequence_index, event.text, event.entry_id, event.logprobs
            )
        elif isinstance(event, Restart):
            yield restart_event(event.attempt)
        elif isinstance(event, Quiet):
            yield ServerSentEvent(comment="keepalive")
        elif isinstance(event, Done) and event.state is not None:
            yield done_event(event.state)
