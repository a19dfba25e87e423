"""OpenAI's `/v1/files`: uploads are our datasets; a batch's output and error files (ids
`<job id>-output`, `<job id>-error`) and a succeeded fine-tuning job's results file (id
`<job id>-results`) are read through here too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from api.cursors import split_page
from api.deps import JobsRead, JobsWrite, ReadSessionDep, SessionDep, SettingsDep
from api.openai_shapes import (
    BATCH_FILE_ID,
    RESULTS_FILE_ID,
    OpenAIList,
    file_of_batch,
    file_of_dataset,
    file_of_results,
    results_content,
)
from api.routes.batch_files import JSONL_MEDIA_TYPE, batch_lines
from api.routes.datasets import remove_dataset, store_dataset
from core.datasets import ParsedDataset
from core.enums import DatasetSchema, JobKind, JobStatus
from core.errors import InvalidRequestError, InvalidStateError, NotFoundError
from db import datasets as datasets_repo
from db import jobs as jobs_repo
from db import training as training_repo
from db.models import Job

router = APIRouter(prefix="/v1/files", tags=["openai"])

Purpose = Literal["fine-tune", "batch"]
BATCH_SCHEMAS = frozenset({DatasetSchema.BATCH_REQUESTS.value})
FINE_TUNE_SCHEMAS = frozenset(s.value for s in DatasetSchema) - BATCH_SCHEMAS


def _fits(purpose: Purpose) -> Callable[[ParsedDataset], None]:
    def check(parsed: ParsedDataset) -> None:
        batch = parsed.schema is DatasetSchema.BATCH_REQUESTS
        if batch != (purpose == "batch"):
            raise InvalidRequestError(
                f"a {purpose} file cannot hold {parsed.schema.value} rows"
                + (" (batch request lines need purpose batch)" if batch else ""),
                param="purpose",
            )

    return check


JobFile = Literal["output", "error", "results"]


def _job_file(session: Session, file_id: str, tenant_id: str) -> tuple[Job, JobFile]:
    """The job a result file belongs to, and which of its files it is: a batch's `output`
    or `error`, a succeeded fine-tuning job's `results`; 404 for any other id."""
    batch = BATCH_FILE_ID.match(file_id)
    if batch is not None:
        job = jobs_repo.get_job(session, batch.group(1), tenant_id)
        if job is not None and job.kind == JobKind.BATCH.value:
            return job, "output" if batch.group(2) == "output" else "error"
    results = RESULTS_FILE_ID.match(file_id)
    if results is not None:
        job = jobs_repo.get_job(session, results.group(1), tenant_id)
        if (
            job is not None
            and job.kind == JobKind.FINETUNE.value
            and job.status == JobStatus.SUCCEEDED.value
        ):
            return job, "results"
    raise NotFoundError(f"no file {file_id!r}", param="file_id")


def _results(session: Session, job: Job) -> bytes:
    """A succeeded fine-tuning job's results file, from its metrics as they are now."""
    return results_content(training_repo.step_metrics(session, job.id))


@router.post("")
def upload_file(
    session: SessionDep,
    settings: SettingsDep,
    who: JobsWrite,
    file: Annotated[UploadFile, File(description="JSON Lines (or CSV/CoNLL for fine-tune)")],
    purpose: Annotated[Purpose, Form(description="fine-tune or batch")],
) -> dict[str, Any]:
    dataset = store_dataset(session, settings, who, file, None, check=_fits(purpose))
    return file_of_dataset(dataset)


@router.get("", response_model=OpenAIList)
def list_files(
    session: ReadSessionDep,
    who: JobsRead,
    purpose: Purpose | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    order: Annotated[Literal["desc"], Query(description="Only newest first")] = "desc",
) -> OpenAIList:
    """Uploaded files, newest first; `after` is the id of the last file of the previous page."""
    before = None
    if after is not None:
        anchor = datasets_repo.get_dataset(session, after, who.tenant_id)
        if anchor is None:
            raise InvalidRequestError(f"after: no file {after!r}", param="after")
        before = (anchor.created_at, anchor.id)
    schemas = (
        None if purpose is None else BATCH_SCHEMAS if purpose == "batch" else FINE_TUNE_SCHEMAS
    )
    rows, has_more = split_page(
        datasets_repo.list_datasets(
            session, tenant_id=who.tenant_id, limit=limit + 1, before=before, schemas=schemas
        ),
        limit,
    )
    return OpenAIList.of([file_of_dataset(d) for d in rows], has_more)


@router.get("/{file_id}")
def retrieve_file(
    file_id: str, session: ReadSessionDep, settings: SettingsDep, who: JobsRead
) -> dict[str, Any]:
    dataset = datasets_repo.get_dataset(session, file_id, who.tenant_id)
    if dataset is not None:
        return file_of_dataset(dataset)
    job, name = _job_file(session, file_id, who.tenant_id)
    if name == "results":
        return file_of_results(job, len(_results(session, job)))
    size = sum(len(line) for line in batch_lines(settings, job.id, errors=name == "error"))
    return file_of_batch(job, name, size)


@router.get(
    "/{file_id}/content",
    response_model=None,
    responses={200: {"content": {"application/octet-stream": {}, JSONL_MEDIA_TYPE: {}}}},
)
def file_content(
    file_id: str, session: ReadSessionDep, settings: SettingsDep, who: JobsRead
) -> FileResponse | StreamingResponse | Response:
    dataset = datasets_repo.get_dataset(session, file_id, who.tenant_id)
    if dataset is not None:
        root = settings.data_dir.resolve()
        path = (root / dataset.path).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise NotFoundError(f"the content of file {file_id!r} is gone", param="file_id")
        return FileResponse(path, media_type="application/octet-stream", filename=dataset.filename)
    job, name = _job_file(session, file_id, who.tenant_id)
    if name == "results":
        return Response(_results(session, job), media_type="application/octet-stream")
    return StreamingResponse(
        batch_lines(settings, job.id, errors=name == "error"), media_type=JSONL_MEDIA_TYPE
    )


@router.delete("/{file_id}")
def delete_file(
    file_id: str, session: SessionDep, settings: SettingsDep, who: JobsWrite
) -> dict[str, Any]:
    if datasets_repo.get_dataset(session, file_id, who.tenant_id) is None:
        _job_file(session, file_id, who.tenant_id)  # 404 unless it is a job's result file
        raise InvalidStateError(
            f"file {file_id!r} is a job's result; it stays as long as its job",
            param="file_id",
        )
    remove_dataset(session, settings, who, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
