"""`GET /v1/jobs/{id}/events/stream`: a job's events (status, progress, logs, errors) as
server-sent events, read from the database, resumable with `Last-Event-ID`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.cursors import MAX_ROW_ID
from api.deps import JobsRead, SettingsDep
from api.schemas import EventOut
from core.enums import JobStatus
from core.states import TERMINAL
from db import events as events_repo
from db import jobs as jobs_repo
from db.session import session_scope

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

POLL_S = 0.5  # how often a waiting stream reads new events
KEEPALIVE_S = 14.0  # a comment line this often while nothing happens
PAGE = 500

LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)]


@dataclass(frozen=True, slots=True)
class Batch:
    status: JobStatus
    events: list[EventOut]


def _read(database_url: str, job_id: str, after: int, tenant_id: str | None) -> Batch:
    """The job's status, then its events after `after`: when the status read is terminal,
    the events read after it include the one that made it so."""
    with session_scope(database_url, readonly=True) as session:
        job = jobs_repo.require_job(session, job_id, tenant_id=tenant_id)
        status = JobStatus(job.status)
        rows = events_repo.list_events(session, job_id, after_id=after, limit=PAGE)
        return Batch(status, [EventOut.of(e) for e in rows])


def _after(last_event_id: str | None) -> int:
    if last_event_id is None or not last_event_id.isdigit():
        return 0
    return min(int(last_event_id), MAX_ROW_ID)


async def first_batch(
    job_id: str, settings: SettingsDep, who: JobsRead, last_event_id: LastEventId = None
) -> Batch:
    """Read before the response starts, so an unknown job gets a typed 404."""
    return await run_in_threadpool(
        _read, settings.database_url, job_id, _after(last_event_id), who.tenant_id
    )


@router.get("/{job_id}/events/stream", response_class=EventSourceResponse)
async def stream_job_events(
    job_id: str,
    first: Annotated[Batch, Depends(first_batch)],
    settings: SettingsDep,
    last_event_id: LastEventId = None,
) -> AsyncIterator[ServerSentEvent]:
    """Every event of the job in order (SSE `event` = its type, `id` = its id), then
    `end` once the job is finished. Reconnect with `Last-Event-ID` to continue after the
    last event received, without gaps or repeats."""
    after = _after(last_event_id)
    batch = first
    quiet_since = time.monotonic()
    while True:
        for event in batch.events:
            after = event.id
            yield ServerSentEvent(
                event=event.type, id=str(event.id), data=event.model_dump(mode="json")
            )
        if batch.events:
            quiet_since = time.monotonic()
        if len(batch.events) < PAGE:
            if batch.status in TERMINAL:
                yield ServerSentEvent(event="end", data={"status": batch.status.value})
                return
            await anyio.sleep(POLL_S)
            if time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ServerSentEvent(comment="keep-alive")
        # The job's tenant was checked by first_batch; a job never changes tenant.
        batch = await run_in_threadpool(_read, settings.database_url, job_id, after, None)
