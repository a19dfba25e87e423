"""What the OpenAI fine-tuning and batch routes share: our job request built from an
OpenAI body, created through `create_job_in`, errors named by OpenAI's fields; and the
lookup of one of the tenant's jobs of a given kind."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Response
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from api.auth import Principal
from api.routes.jobs import create_job_in
from core.dispatch import JobPublisher
from core.enums import JobKind
from core.errors import InvalidRequestError, NotFoundError
from core.settings import Settings
from core.specs import AnyJobRequest
from db import jobs as jobs_repo
from db.models import Job

RequestT = TypeVar("RequestT", bound=BaseModel)


def openai_request(
    model: type[RequestT], payload: dict[str, Any], params: dict[str, str]
) -> RequestT:
    """`payload` as our job request; a validation error names the OpenAI field (`params`
    maps our field paths to OpenAI's)."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = openai_param(".".join(str(p) for p in first["loc"]), params)
        raise InvalidRequestError(f"{param}: {first['msg']}", param=param) from None


def openai_param(ours: str, params: dict[str, str]) -> str:
    """Our field path as OpenAI's: its own entry in `params`, or the longest entry that is a
    parent of it with the rest of the path kept (`spec.reinforcement.grader.type` ->
    `method.reinforcement.grader.type`)."""
    if ours in params:
        return params[ours]
    parents = [p for p in params if ours.startswith(f"{p}.")]
    if not parents:
        return ours
    parent = max(parents, key=len)
    return params[parent] + ours[len(parent) :]


def create_openai_job(
    session: Session,
    req: AnyJobRequest,
    params: dict[str, str],
    response: Response,
    settings: Settings,
    publisher: JobPublisher,
    who: Principal,
    idempotency_key: str | None,
) -> str:
    """Create the job like `POST /v1/jobs` does (answered 200, as OpenAI does); returns its id."""
    try:
        out = create_job_in(session, req, response, settings, publisher, who, idempotency_key)
    except InvalidRequestError as exc:
        if exc.param is not None:
            exc.param = openai_param(exc.param, params)
        raise
    response.status_code = 200
    return out.id


def job_of_kind(
    session: Session, job_id: str, who: Principal, kind: JobKind, what: str, param: str
) -> Job:
    """The tenant's job `job_id` when it is of `kind`; else 404 like a missing one."""
    job = jobs_repo.get_job(session, job_id, who.tenant_id)
    if job is None or job.kind != kind.value:
        raise NotFoundError(f"no {what} {job_id!r}", param=param)
    return job
