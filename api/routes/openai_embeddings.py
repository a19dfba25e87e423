"""OpenAI's `POST /v1/embeddings`: each request is an `embed` job, created as `POST /v1/jobs`
creates one (checks, quota, rate limit, Idempotency-Key, audit) and answered once it ends.

The request waits on the job's token stream, whose `end` the worker writes right after the
final status commits, then answers from the database: the vectors are the job's outputs,
so an idempotent replay of a finished job answers the same vectors without running it
again. A client that goes away cancels its job, unless it sent an Idempotency-Key (it may
come back for the answer). Workers encode the inputs of concurrent requests on the same
model together (workers/embedding/jobs.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.auth import Principal
from api.deps import (
    JobsWrite,
    PublisherDep,
    SettingsDep,
    TokenReaderDep,
    in_create_slot,
    request_session,
)
from api.job_follow import (
    ClientDisconnected,
    Follower,
    JobState,
    ending_error,
    follow_to_end,
    job_state,
)
from api.openai_jobs import create_openai_job, openai_request
from api.routes.jobs import REPLAYED_HEADER, IdempotencyKey, cancel_in
from api.serving_requests import json_body, request_body_doc, validated_body
from core.dispatch import JobPublisher
from core.embeddings import EMBEDDING_KEY, base64_to_vector
from core.enums import JobKind, JobStatus
from core.errors import (
    BadRequestError,
    InvalidRequestError,
    JobFailedError,
    ModelNotFoundError,
    ModelNotInstalledError,
    ModelyardError,
)
from core.settings import Settings
from core.specs import MAX_EMBED_INPUTS, EmbedJobRequest
from db import jobs as jobs_repo
from db import outputs as outputs_repo
from db.registry import get_model, is_registry_name

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/embeddings", tags=["openai"])

PARAMS = {
    "spec.model": "model",
    "spec.input": "input",
    "spec.dimensions": "dimensions",
    "metadata.user": "user",
}
CLIENT_CLOSED = 499  # nginx's status for a client that closed its connection first
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
INPUT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "maxItems": MAX_EMBED_INPUTS,
        },
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_EMBED_INPUTS},
    ]
}


class CreateEmbeddings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        max_length=255,
        description="An encoder: a model directory name, a "
        "registered model or an allowed hub id, e.g. all-MiniLM-L6-v2.",
    )
    # Validated by EmbedSpec, which names the first bad input rather than every union branch.
    input: Annotated[
        Any,
        Field(
            description="A string, an array of strings, an array of token ids or an array of "
            f"arrays of token ids; at most {MAX_EMBED_INPUTS}, none empty.",
            json_schema_extra=INPUT_SCHEMA,
        ),
    ]
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="`base64`: each vector as little-endian float32 bytes."
    )
    dimensions: int | None = Field(
        default=None, description="Refused unless it is the model's own width."
    )
    user: str | None = Field(
        default=None, max_length=512, description="Kept as the job's `user` metadata."
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """The answer (documented; the route writes it without building these models)."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


@dataclass(frozen=True)
class _Created:
    job_id: str
    state: JobState
    replayed: bool


@router.post(
    "",
    response_model=None,
    openapi_extra=request_body_doc(CreateEmbeddings),
    responses={200: {"model": EmbeddingList, "description": "One vector per input, in order."}},
)
async def create_embeddings(
    request: Request,
    response: Response,
    settings: SettingsDep,
    publisher: PublisherDep,
    reader: TokenReaderDep,
    who: JobsWrite,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    body = validated_body(CreateEmbeddings, await json_body(request), "embeddings")
    created = await in_create_slot(
        request, _create, body, response, settings, publisher, who, idempotency_key
    )
    state: JobState | None = created.state
    if not created.state.terminal:
        follower = Follower(
            reader, settings.database_url, created.job_id, created.state.attempts, tokens=False
        )
        try:
            state = await follow_to_end(follower, request.is_disconnected)
        except ClientDisconnected:
            if idempotency_key is None:
                await run_in_threadpool(_cancel, settings, publisher, who, created.job_id)
            return Response(status_code=CLIENT_CLOSED)
    content = await run_in_threadpool(_answer, settings, created.job_id, state, body)
    headers = {"Modelyard-Job-Id": created.job_id}
    if created.replayed:
        headers[REPLAYED_HEADER] = "true"
    return JSONResponse(content, headers=headers)


def _create(
    body: CreateEmbeddings,
    response: Response,
    settings: Settings,
    publisher: JobPublisher,
    who: Principal,
    idempotency_key: str | None,
) -> _Created:
    spec = {"model": body.model, "input": body.input, "dimensions": body.dimensions}
    payload = {
        "kind": JobKind.EMBED.value,
        "spec": spec,
        "metadata": {} if body.user is None else {"user": body.user},
    }
    try:
        req = openai_request(EmbedJobRequest, payload, PARAMS)
        with request_session(settings) as session:
            if is_registry_name(body.model) and not get_model(session, body.model, who.tenant_id):
                raise ModelNotFoundError(f"model {body.model!r} does not exist", param="model")
            try:
                job_id = create_openai_job(
                    session, req, PARAMS, response, settings, publisher, who, idempotency_key
                )
            except ModelyardError as exc:  # create_openai_job renames InvalidRequestError's
                exc.param = PARAMS.get(exc.param or "", exc.param)
                raise
    except ModelNotInstalledError as exc:
        raise ModelNotFoundError(exc.message, param="model") from None
    except InvalidRequestError as exc:  # OpenAI answers a bad embeddings request 400
        raise BadRequestError(exc.message, param=exc.param) from None
    state = job_state(settings.database_url, job_id)
    if state is None:  # deleted in between: nothing sensible left to wait for
        raise JobFailedError(f"job {job_id} disappeared before it ran")
    return _Created(job_id, state, response.headers.get(REPLAYED_HEADER) == "true")


def _cancel(settings: Settings, publisher: JobPublisher, who: Principal, job_id: str) -> None:
    with request_session(settings) as session:
        job = cancel_in(session, publisher, who, job_id)
    logger.info("job %s: its client went away; cancel requested (now %s)", job_id, job.status)


def _answer(
    settings: Settings, job_id: str, state: JobState | None, body: CreateEmbeddings
) -> dict[str, Any]:
    if state is None or state.status is not JobStatus.SUCCEEDED:
        raise ending_error(job_id, state, "input")
    with request_session(settings) as session:
        job = jobs_repo.get_job(session, job_id)
        outputs = outputs_repo.list_outputs(session, job_id)
        if job is None:
            raise ending_error(job_id, None, "input")
        result = dict(job.result or {})
        model = str(job.spec["model"])
        vectors = [(o.prompt_index, str((o.data or {})[EMBEDDING_KEY])) for o in outputs]
    as_floats = body.encoding_format == "float"
    usage = result.get("usage") or {"prompt_tokens": 0, "total_tokens": 0}
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": index,
                "embedding": base64_to_vector(vector) if as_floats else vector,
            }
            for index, vector in vectors
        ],
        "model": model,
        "usage": {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["total_tokens"]},
    }
