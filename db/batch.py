"""Batch job repository: lines stored under the attempt's fence, file downloads, queued expiry."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.enums import FailureType, JobKind, JobStatus
from db.attempts import finish_job
from db.base import utcnow
from db.fencing import fence
from db.jobs import transition
from db.models import Job, Output
from db.outputs import OutputRecord, add_outputs

ERROR_FINISH_REASON = "error"
"""finish_reason of a stored line that failed; its `data` is an OpenAI error line."""


def store_lines(session: Session, job_id: str, attempt: int, lines: Iterable[OutputRecord]) -> bool:
    """Add finished lines (one row each) if `attempt` still holds the running job (the row
    stays locked until commit, see db/fencing.py); False adds nothing."""
    if not fence(session, job_id, attempt):
        return False
    add_outputs(session, job_id, lines)
    return True


def stored_lines(session: Session, job_id: str) -> dict[int, bool]:
    """Line index -> whether it failed, for every line with a stored result."""
    stmt = select(Output.prompt_index, Output.finish_reason).where(Output.job_id == job_id)
    return {index: reason == ERROR_FINISH_REASON for index, reason in session.execute(stmt)}


def iter_line_data(
    session: Session, job_id: str, *, errors: bool, page: int = 500
) -> Iterator[dict[str, Any]]:
    """Stored output lines (or error lines) in line order, read a page at a time."""
    after = -1
    failed = Output.finish_reason == ERROR_FINISH_REASON
    while True:
        stmt = (
            select(Output.prompt_index, Output.data)
            .where(
                Output.job_id == job_id,
                Output.sequence_index == 0,
                Output.prompt_index > after,
                failed if errors else ~failed,
            )
            .order_by(Output.prompt_index)
            .limit(page)
        )
        rows = session.execute(stmt).all()
        for index, data in rows:
            after = index
            if data is not None:
                yield data
        if len(rows) < page:
            return


def queued_batches(session: Session, limit: int = 1000) -> Sequence[Job]:
    """Queued batch jobs, oldest first (each one's deadline depends on its spec)."""
    stmt = (
        select(Job)
        .where(Job.status == JobStatus.QUEUED.value, Job.kind == JobKind.BATCH.value)
        .order_by(Job.created_at)
        .limit(limit)
    )
    return session.scalars(stmt).all()


def expire_queued(
    session: Session,
    job_id: str,
    lines: Iterable[OutputRecord],
    *,
    result: dict[str, Any],
    message: str,
) -> bool:
    """queued -> expired, adding the unfinished lines' error rows; False (nothing written)
    when the job is no longer queued."""
    expired = FailureType.BATCH_EXPIRED.value
    if not transition(
        session,
        job_id,
        JobStatus.QUEUED,
        JobStatus.EXPIRED,
        values={
            "finished_at": utcnow(),
            "result": result,
            "error_type": expired,
            "error_message": message,
        },
        message=message,
        data={"error_type": expired},
    ):
        return False
    add_outputs(session, job_id, lines)
    return True


def expire_running(
    session: Session,
    job_id: str,
    attempt: int,
    lines: Iterable[OutputRecord],
    *,
    result: dict[str, Any],
    message: str,
) -> bool:
    """running -> expired while `attempt` holds the job, adding the unfinished lines'
    error rows; False (nothing written) when it does not hold it."""
    if not finish_job(
        session,
        job_id,
        JobStatus.EXPIRED,
        attempt=attempt,
        error_type=FailureType.BATCH_EXPIRED.value,
        error_message=message,
        result=result,
    ):
        return False
    add_outputs(session, job_id, lines)
    return True
