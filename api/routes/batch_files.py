"""A batch job's output and error files, as OpenAI JSON Lines streamed from stored lines.

Lines are stored as they finish, so both files can be read while the job runs
(partial) and after it was cancelled or expired (what finished stays).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api.deps import JobsRead, ReadSessionDep, SettingsDep
from core.enums import JobKind
from core.errors import NotFoundError
from core.settings import Settings
from db import jobs as jobs_repo
from db.batch import iter_line_data
from db.session import session_scope

router = APIRouter(prefix="/v1/jobs", tags=["batches"])

JSONL_MEDIA_TYPE = "application/jsonl"
FILES = ("output", "error")


def batch_lines(settings: Settings, job_id: str, errors: bool) -> Iterator[bytes]:
    # The response streams after the route returned: it reads in its own session.
    with session_scope(settings.database_url, readonly=True) as session:
        for data in iter_line_data(session, job_id, errors=errors):
            yield (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


@router.get(
    "/{job_id}/files/{name}",
    response_class=StreamingResponse,
    responses={200: {"content": {JSONL_MEDIA_TYPE: {}}}},
)
def download_batch_file(
    job_id: str, name: str, session: ReadSessionDep, settings: SettingsDep, who: JobsRead
) -> StreamingResponse:
    """`output`: one line per request that succeeded; `error`: one per request that failed."""
    if name not in FILES:
        raise NotFoundError(f"no file {name!r}; a batch has output and error", param="name")
    job = jobs_repo.require_job(session, job_id, tenant_id=who.tenant_id)
    if job.kind != JobKind.BATCH.value:
        raise NotFoundError(
            f"job {job_id!r} is a {job.kind} job; only batch jobs have files", param="job_id"
        )
    return StreamingResponse(
        batch_lines(settings, job_id, errors=name == "error"),
        media_type=JSONL_MEDIA_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{job_id}_{name}.jsonl"'},
    )
