"""Response shapes of the HTTP API."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from db.models import Checkpoint, Dataset, Job, JobEvent, Metric, Output, RegisteredModel


class JobError(BaseModel):
    type: str
    message: str | None


class QueueOut(BaseModel):
    name: str
    position: int
    depth: int


class JobOut(BaseModel):
    id: str
    kind: str
    status: str
    priority: int
    spec: dict[str, Any]
    metadata: dict[str, Any]
    attempts: int = Field(
        description="Attempts started; the newest one's number fences its writes."
    )
    max_attempts: int
    handbacks: int = Field(
        default=0,
        description="Attempts that do not count toward max_attempts: handed back by a worker "
        "shutting down, or paused.",
    )
    progress: float
    progress_detail: dict[str, Any] | None
    cancel_requested: bool
    pause_requested: bool = False
    error: JobError | None
    result: dict[str, Any] | None
    created_at: datetime
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None = None
    max_runtime_s: float | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    queue: QueueOut | None = Field(
        default=None,
        description="For a queued job read by id: its place on its queue (1 = next) and "
        "how many jobs wait there.",
    )

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            priority=job.priority,
            spec=job.spec,
            metadata=job.metadata_,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            handbacks=job.handbacks,
            progress=job.progress,
            progress_detail=job.progress_detail,
            cancel_requested=job.cancel_requested,
            pause_requested=job.pause_requested,
            error=JobError(type=job.error_type, message=job.error_message)
            if job.error_type
            else None,
            result=job.result,
            created_at=job.created_at,
            queued_at=job.queued_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            expires_at=job.expires_at,
            max_runtime_s=job.max_runtime_s,
            webhook_url=job.webhook_url,
            webhook_events=job.webhook_events.strip(",").split(",") if job.webhook_events else None,
        )

    @classmethod
    def of_new(cls, row: Mapping[str, Any]) -> JobOut:
        """A job just inserted as `row` (db.jobs.insert_queued_job): queued, not started."""
        events = row["webhook_events"]
        return cls(
            id=row["id"],
            kind=row["kind"],
            status=row["status"],
            priority=row["priority"],
            spec=row["spec"],
            metadata=row["metadata_"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            handbacks=row["handbacks"],
            progress=row["progress"],
            progress_detail=None,
            cancel_requested=row["cancel_requested"],
            pause_requested=row["pause_requested"],
            error=None,
            result=None,
            created_at=row["created_at"],
            queued_at=row["queued_at"],
            started_at=None,
            finished_at=None,
            expires_at=row["expires_at"],
            max_runtime_s=row["max_runtime_s"],
            webhook_url=row["webhook_url"],
            webhook_events=events.strip(",").split(",") if events else None,
        )


class JobList(BaseModel):
    data: list[JobOut]
    has_more: bool
    next_cursor: str | None


class EventOut(BaseModel):
    id: int
    job_id: str
    type: str
    message: str
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        return cls(
            id=event.id,
            job_id=event.job_id,
            type=event.type,
            message=event.message,
            data=event.data,
            created_at=event.created_at,
        )


class EventList(BaseModel):
    data: list[EventOut]
    has_more: bool
    last_id: int | None


class OutputOut(BaseModel):
    prompt_index: int
    sequence_index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    data: dict[str, Any] | None

    @classmethod
    def of(cls, out: Output) -> OutputOut:
        return cls(
            prompt_index=out.prompt_index,
            sequence_index=out.sequence_index,
            text=out.text,
            finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            data=out.data,
        )


class OutputList(BaseModel):
    job_id: str
    status: str
    data: list[OutputOut]


class Health(BaseModel):
    status: str
    database: str | None = None
    broker: str | None = None
    auth: str | None = None  # "on", or "disabled" in development mode


class MetricOut(BaseModel):
    id: int
    step: int
    epoch: float | None
    name: str
    value: float

    @classmethod
    def of(cls, m: Metric) -> MetricOut:
        return cls(id=m.id, step=m.step, epoch=m.epoch, name=m.name, value=m.value)


class MetricList(BaseModel):
    job_id: str
    data: list[MetricOut]
    has_more: bool
    last_id: int | None


class CheckpointOut(BaseModel):
    step: int
    metrics: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, c: Checkpoint) -> CheckpointOut:
        return cls(step=c.step, metrics=c.metrics, created_at=c.created_at)


class CheckpointList(BaseModel):
    job_id: str
    data: list[CheckpointOut]


class ModelOut(BaseModel):
    """A registered model; `id`, `object`, `created` and `owned_by` are OpenAI's Model."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds (OpenAI's field; same as created_at).")
    owned_by: str = Field(description="The tenant that owns the model.")
    name: str
    base_model: str
    task: str
    method: str
    adapter: bool
    job_id: str | None
    labels: list[str]
    metrics: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, m: RegisteredModel) -> ModelOut:
        return cls(
            id=m.name,
            created=int(m.created_at.timestamp()),
            owned_by=m.tenant_id,
            name=m.name,
            base_model=m.base_model,
            task=m.task,
            method=m.method,
            adapter=m.adapter,
            job_id=m.job_id,
            labels=m.labels,
            metrics=m.metrics,
            created_at=m.created_at,
        )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]
    has_more: bool
    next_cursor: str | None


class InstalledModelOut(BaseModel):
    """A model directory installed under the data dir's models/, usable by name."""

    id: str = Field(description="The directory name; what a job's `model` names.")
    object: Literal["model"] = "model"
    architectures: list[str] = Field(description="`architectures` from its config.json.")
    chat_template: bool = Field(
        description="Its tokenizer has a chat template, so it answers chat completions."
    )


class InstalledModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InstalledModelOut]


class ModelDeleted(BaseModel):
    """OpenAI's answer to deleting a model."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool


class DatasetOut(BaseModel):
    id: str
    filename: str
    format: str
    # `schema` would shadow a BaseModel attribute; the JSON name is still "schema".
    schema_: str = Field(alias="schema")
    rows: int
    labels: list[str]
    sha256: str
    size_bytes: int
    report: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, ds: Dataset) -> DatasetOut:
        return cls(
            id=ds.id,
            filename=ds.filename,
            format=ds.format,
            schema=ds.schema,
            rows=ds.rows,
            labels=ds.labels,
            sha256=ds.sha256,
            size_bytes=ds.size_bytes,
            report=ds.report,
            created_at=ds.created_at,
        )


class DatasetList(BaseModel):
    data: list[DatasetOut]
    has_more: bool
    next_cursor: str | None


class DatasetTokensOut(BaseModel):
    """A dataset's training examples counted with a model's tokenizer, as training encodes
    them (chat template for chat rows, prompt then completion, text with eos)."""

    object: Literal["dataset.tokens"] = "dataset.tokens"
    dataset_id: str
    model: str
    # `schema` would shadow a BaseModel attribute; the JSON name is still "schema".
    schema_: str = Field(alias="schema")
    examples: int = Field(description="Rows counted: every row of the dataset.")
    tokens: int = Field(description="Tokens of every example, whole.")
    min_tokens: int
    mean_tokens: float
    max_tokens: int
    max_length: int = Field(description="Where training cuts an example (the query's, else ours).")
    context_length: int | None = Field(description="The model's context, when its config says.")
    truncated: int = Field(description="Examples longer than max_length: training cuts them.")
    tokens_kept: int = Field(description="Tokens one epoch over every example trains on.")
