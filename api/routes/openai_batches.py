"""OpenAI's `/v1/batches`: each one is our batch job over an uploaded file of request lines;
its output and error files are read through `/v1/files`."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy.orm import Session

from api.auth import Principal
from api.cursors import split_page
from api.deps import JobsRead, JobsWrite, PublisherDep, ReadSessionDep, SessionDep, SettingsDep
from api.openai_jobs import create_openai_job, job_of_kind, openai_request
from api.openai_shapes import OpenAIList, batch
from api.routes.jobs import IdempotencyKey, cancel_in
from core.enums import BatchEndpoint, JobKind
from core.specs import BatchJobRequest
from db import datasets as datasets_repo
from db import jobs as jobs_repo
from db.models import Job

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/batches", tags=["openai"])

PARAMS = {
    "spec.input_dataset": "input_file_id",
    "spec.endpoint": "endpoint",
    "spec.completion_window": "completion_window",
}


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: BatchEndpoint
    completion_window: str = "24h"
    metadata: dict[Annotated[str, StringConstraints(max_length=64)], str] | None = Field(
        default=None, max_length=16
    )


def _shape(session: Session, job: Job) -> dict[str, Any]:
    ds = datasets_repo.get_dataset(session, job.spec["input_dataset"], job.tenant_id)
    return batch(job, ds.rows if ds is not None else 0)


def _job(session: Session, batch_id: str, who: Principal) -> Job:
    return job_of_kind(session, batch_id, who, JobKind.BATCH, "batch", "batch_id")


@router.post("")
def create_batch(
    body: CreateBatch,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    publisher: PublisherDep,
    who: JobsWrite,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    payload = {
        "kind": JobKind.BATCH.value,
        "spec": {
            "input_dataset": body.input_file_id,
            "endpoint": body.endpoint.value,
            "completion_window": body.completion_window,
        },
        "metadata": body.metadata or {},
    }
    req = openai_request(BatchJobRequest, payload, PARAMS)
    job_id = create_openai_job(
        session, req, PARAMS, response, settings, publisher, who, idempotency_key
    )
    return _shape(session, _job(session, job_id, who))


@router.get("", response_model=OpenAIList)
def list_batches(
    session: ReadSessionDep,
    who: JobsRead,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> OpenAIList:
    before = None
    if after is not None:
        anchor = _job(session, after, who)
        before = (anchor.created_at, anchor.id)
    rows, has_more = split_page(
        jobs_repo.list_jobs(
            session,
            jobs_repo.JobFilter(kind=JobKind.BATCH),
            tenant_id=who.tenant_id,
            limit=limit + 1,
            before=before,
        ),
        limit,
    )
    return OpenAIList.of([_shape(session, j) for j in rows], has_more)


@router.get("/{batch_id}")
def retrieve_batch(batch_id: str, session: ReadSessionDep, who: JobsRead) -> dict[str, Any]:
    return _shape(session, _job(session, batch_id, who))


@router.post("/{batch_id}/cancel")
def cancel_batch(
    batch_id: str, session: SessionDep, publisher: PublisherDep, who: JobsWrite
) -> dict[str, Any]:
    _job(session, batch_id, who)
    job = cancel_in(session, publisher, who, batch_id)
    logger.info("batch %s cancel requested (now %s)", batch_id, job.status)
    return _shape(session, job)
