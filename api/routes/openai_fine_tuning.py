"""OpenAI's `/v1/fine_tuning/jobs`: each one is our fine-tune job (same id, events and
checkpoints), created through the same path as `POST /v1/jobs`."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy.orm import Session

from api.auth import Principal
from api.cursors import split_page
from api.deps import JobsRead, JobsWrite, PublisherDep, ReadSessionDep, SessionDep, SettingsDep
from api.openai_jobs import create_openai_job, job_of_kind, openai_request
from api.openai_shapes import (
    CHECKPOINT_ID,
    EVENT_ID_PREFIX,
    OpenAIList,
    base_learning_rate,
    fine_tuning_checkpoint,
    fine_tuning_event,
    fine_tuning_job,
)
from api.routes.jobs import IdempotencyKey, cancel_in, publish_job
from core.enums import DatasetSchema, FineTuneObjective, FineTuneTask, JobKind
from core.errors import InvalidRequestError, UnsupportedParameterError
from core.specs import FineTuneJobRequest
from db import datasets as datasets_repo
from db import events as events_repo
from db import jobs as jobs_repo
from db import pauses as pauses_repo
from db import training as training_repo
from db.models import Job

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai"])

Auto = Literal["auto"]
METADATA_PARAM = re.compile(r"metadata\[([A-Za-z0-9_.\-]{1,64})\]")
TASK_FOR_SCHEMA = {
    DatasetSchema.CLASSIFICATION.value: FineTuneTask.SEQUENCE_CLASSIFICATION,
    DatasetSchema.TOKEN_CLASSIFICATION.value: FineTuneTask.TOKEN_CLASSIFICATION,
}
# Our request's field names as OpenAI's, for error params.
PARAMS = {
    "spec.base_model": "model",
    "spec.training_dataset": "training_file",
    "spec.validation_dataset": "validation_file",
    "spec.suffix": "suffix",
    "spec.hyperparameters.epochs": "hyperparameters.n_epochs",
    "spec.hyperparameters.batch_size": "hyperparameters.batch_size",
    "spec.hyperparameters.learning_rate": "hyperparameters.learning_rate_multiplier",
    "spec.hyperparameters.seed": "seed",
    "spec.dpo.beta": "method.dpo.hyperparameters.beta",
    "spec.hyperparameters.eval_steps": "method.reinforcement.hyperparameters.eval_interval",
    "spec.reinforcement.grader": "method.reinforcement.grader",
    "spec.reinforcement.generations": "method.reinforcement.hyperparameters.generations",
    "spec.reinforcement.max_completion_tokens": (
        "method.reinforcement.hyperparameters.max_completion_tokens"
    ),
    "spec.reinforcement.temperature": "method.reinforcement.hyperparameters.temperature",
}
NOT_HONOURED = {
    "compute_multiplier": "compute is what the hyperparameters make it",
    "eval_samples": "each validation prompt gets `generations` completions, as in training",
}
"""OpenAI's reinforcement hyperparameters this server cannot honour, and why; only `auto`
is accepted for them (`reasoning_effort`: `default`)."""


class OpenAIHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto = "auto"
    batch_size: int | Auto = "auto"
    learning_rate_multiplier: float | Auto = "auto"


class DpoHyperparameters(OpenAIHyperparameters):
    beta: float | Auto = "auto"


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: OpenAIHyperparameters | None = None


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparameters | None = None


class ReinforcementHyperparameters(OpenAIHyperparameters):
    """OpenAI's, plus ours: `generations` per prompt, `max_completion_tokens`, `temperature`
    (reinforcement's settings of the same names)."""

    eval_interval: int | Auto = "auto"
    eval_samples: int | Auto = "auto"
    compute_multiplier: float | Auto = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    generations: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None

    def checked(self) -> ReinforcementHyperparameters:
        """These hyperparameters, once none asks what cannot be honoured."""
        for name, why in NOT_HONOURED.items():
            if getattr(self, name) != "auto":
                param = f"method.reinforcement.hyperparameters.{name}"
                raise UnsupportedParameterError(f"{param} is not offered: {why}", param=param)
        if self.reasoning_effort != "default":
            param = "method.reinforcement.hyperparameters.reasoning_effort"
            raise UnsupportedParameterError(
                f"{param}: the models tuned here have no reasoning effort to set", param=param
            )
        return self


class ReinforcementMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(BaseModel):
    """`supervised`, `dpo` or `reinforcement` (our objective of that name)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    def checked(self) -> Method:
        """This method, once only its own block is set (reinforcement needs its own)."""
        if self.type == "reinforcement" and self.reinforcement is None:
            raise InvalidRequestError(
                "method.reinforcement: a reinforcement method needs its grader",
                param="method.reinforcement",
            )
        for block in ("supervised", "dpo", "reinforcement"):
            if block != self.type and getattr(self, block) is not None:
                raise InvalidRequestError(
                    f"method.{block} does not go with method.type {self.type!r}",
                    param=f"method.{block}",
                )
        return self

    @property
    def hyperparameters(self) -> OpenAIHyperparameters | None:
        given: SupervisedMethod | DpoMethod | ReinforcementMethod | None = self.supervised
        if self.type == "dpo":
            given = self.dpo
        elif self.type == "reinforcement":
            given = self.reinforcement
        return given.hyperparameters if given is not None else None


class CreateFineTuningJob(BaseModel):
    """OpenAI's body; `integrations` are not offered (null or `[]`, asking for none, pass)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: OpenAIHyperparameters | None = None
    method: Method | None = None
    suffix: str | None = None
    seed: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[Annotated[str, StringConstraints(max_length=64)], str] | None = Field(
        default=None, max_length=16
    )


def _hyperparameters(body: CreateFineTuningJob, task: FineTuneTask) -> dict[str, Any]:
    given = body.hyperparameters
    if body.method is not None and body.method.hyperparameters is not None:
        if given is not None:  # OpenAI's old place and its new one: which would win is a guess
            raise InvalidRequestError(
                "give hyperparameters once: in method (hyperparameters at the top level is "
                "OpenAI's older place for them)",
                param="hyperparameters",
            )
        given = body.method.hyperparameters
    given = given or OpenAIHyperparameters()
    hp: dict[str, Any] = {}
    if given.n_epochs != "auto":
        hp["epochs"] = given.n_epochs
    if given.batch_size != "auto":
        hp["batch_size"] = given.batch_size
    if given.learning_rate_multiplier != "auto":
        hp["learning_rate"] = base_learning_rate(task) * given.learning_rate_multiplier
    if body.seed is not None:
        hp["seed"] = body.seed
    return hp


def _reinforcement(method: ReinforcementMethod, hp: dict[str, Any]) -> dict[str, Any]:
    """Our reinforcement settings (and `eval_interval` as `hp`'s eval_steps)."""
    settings: dict[str, Any] = {"grader": method.grader}
    given = (method.hyperparameters or ReinforcementHyperparameters()).checked()
    if given.eval_interval != "auto":
        hp["eval_steps"] = given.eval_interval
    for name in ("generations", "max_completion_tokens", "temperature"):
        if getattr(given, name) is not None:
            settings[name] = getattr(given, name)
    return settings


def _request(session: Session, body: CreateFineTuningJob, tenant_id: str) -> FineTuneJobRequest:
    if body.integrations:
        raise InvalidRequestError(
            "integrations are not offered (POST /v1/jobs takes a fine-tune's `tracking`)",
            param="integrations",
        )
    method = body.method.checked() if body.method is not None else None
    train = datasets_repo.get_dataset(session, body.training_file, tenant_id)
    task = TASK_FOR_SCHEMA.get(train.schema if train else "", FineTuneTask.CAUSAL_LM)
    spec: dict[str, Any] = {
        "base_model": body.model,
        "task": task.value,
        "training_dataset": body.training_file,
        "hyperparameters": _hyperparameters(body, task),
    }
    if method is not None and method.type == "dpo":
        spec["task"] = FineTuneTask.CAUSAL_LM.value
        spec["objective"] = FineTuneObjective.DPO.value
        given = method.hyperparameters
        if isinstance(given, DpoHyperparameters) and given.beta != "auto":
            spec["dpo"] = {"beta": given.beta}
    if method is not None and method.reinforcement is not None:
        spec["task"] = FineTuneTask.CAUSAL_LM.value
        spec["objective"] = FineTuneObjective.REINFORCEMENT.value
        spec["reinforcement"] = _reinforcement(method.reinforcement, spec["hyperparameters"])
    if body.validation_file is not None:
        spec["validation_dataset"] = body.validation_file
    if body.suffix is not None:
        spec["suffix"] = body.suffix
    payload = {"kind": JobKind.FINETUNE.value, "spec": spec, "metadata": body.metadata or {}}
    return openai_request(FineTuneJobRequest, payload, PARAMS)


def _job(session: Session, job_id: str, who: Principal) -> Job:
    what, param = "fine-tuning job", "fine_tuning_job_id"
    return job_of_kind(session, job_id, who, JobKind.FINETUNE, what, param)


@router.post("")
def create_fine_tuning_job(
    body: CreateFineTuningJob,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    publisher: PublisherDep,
    who: JobsWrite,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    req = _request(session, body, who.tenant_id)
    job_id = create_openai_job(
        session, req, PARAMS, response, settings, publisher, who, idempotency_key
    )
    return fine_tuning_job(_job(session, job_id, who))


def _metadata_filters(request: Request) -> dict[str, str]:
    """OpenAI's `metadata[key]=value` query parameters."""
    found: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        match = METADATA_PARAM.fullmatch(name)
        if match is not None:
            found[match.group(1)] = value
    return found


@router.get("", response_model=OpenAIList)
def list_fine_tuning_jobs(
    request: Request,
    session: ReadSessionDep,
    who: JobsRead,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> OpenAIList:
    """Newest first; `metadata[key]=value` keeps the jobs whose metadata has it."""
    before = None
    if after is not None:
        anchor = _job(session, after, who)
        before = (anchor.created_at, anchor.id)
    rows, has_more = split_page(
        jobs_repo.list_jobs(
            session,
            jobs_repo.JobFilter(kind=JobKind.FINETUNE, metadata=_metadata_filters(request)),
            tenant_id=who.tenant_id,
            limit=limit + 1,
            before=before,
        ),
        limit,
    )
    return OpenAIList.of([fine_tuning_job(j) for j in rows], has_more)


@router.get("/{job_id}")
def retrieve_fine_tuning_job(job_id: str, session: ReadSessionDep, who: JobsRead) -> dict[str, Any]:
    return fine_tuning_job(_job(session, job_id, who))


@router.post("/{job_id}/cancel")
def cancel_fine_tuning_job(
    job_id: str, session: SessionDep, publisher: PublisherDep, who: JobsWrite
) -> dict[str, Any]:
    _job(session, job_id, who)
    job = cancel_in(session, publisher, who, job_id)
    return fine_tuning_job(job)


@router.post("/{job_id}/pause")
def pause_fine_tuning_job(job_id: str, session: SessionDep, who: JobsWrite) -> dict[str, Any]:
    _job(session, job_id, who)
    job = pauses_repo.request_pause(session, job_id, tenant_id=who.tenant_id)
    who.audit(session, "job.pause", "job", job_id)
    session.commit()
    return fine_tuning_job(job)


@router.post("/{job_id}/resume")
def resume_fine_tuning_job(
    job_id: str, session: SessionDep, publisher: PublisherDep, who: JobsWrite
) -> dict[str, Any]:
    _job(session, job_id, who)
    job = pauses_repo.resume(session, job_id, tenant_id=who.tenant_id)
    who.audit(session, "job.resume", "job", job_id)
    session.commit()
    publish_job(publisher, job)
    return fine_tuning_job(job)


@router.get("/{job_id}/events", response_model=OpenAIList)
def list_fine_tuning_events(
    job_id: str,
    session: ReadSessionDep,
    who: JobsRead,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
) -> OpenAIList:
    """Newest first, like OpenAI; `after` is the last event id of the previous page."""
    _job(session, job_id, who)
    before_id = None
    if after is not None:
        raw = after.removeprefix(EVENT_ID_PREFIX)
        if not raw.isdigit():
            raise InvalidRequestError(f"after: {after!r} is not an event id", param="after")
        before_id = int(raw)
    rows, has_more = split_page(
        events_repo.list_events_newest_first(session, job_id, before_id=before_id, limit=limit + 1),
        limit,
    )
    return OpenAIList.of([fine_tuning_event(e) for e in rows], has_more)


@router.get("/{job_id}/checkpoints", response_model=OpenAIList)
def list_fine_tuning_checkpoints(
    job_id: str,
    session: ReadSessionDep,
    who: JobsRead,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> OpenAIList:
    """Newest first; `after` is the last checkpoint id of the previous page."""
    job = _job(session, job_id, who)
    rows = list(training_repo.list_checkpoints(session, job_id))
    if after is not None:
        match = CHECKPOINT_ID.match(after)
        if match is None or match.group(2) != job_id:
            raise InvalidRequestError(f"after: {after!r} is not a checkpoint id", param="after")
        rows = [c for c in rows if c.step < int(match.group(1))]
    page, has_more = split_page(rows, limit)
    return OpenAIList.of([fine_tuning_checkpoint(job, c) for c in page], has_more)
