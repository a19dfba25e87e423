"""Expiring queued batch jobs whose completion window passed before any worker ran them."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from core.datasets import load_dataset_rows
from core.errors import DatasetFormatError, PermanentJobError
from core.settings import Settings
from core.specs import BatchSpec
from core.storage import artifact_store
from db.base import utcnow
from db.batch import expire_queued, queued_batches, stored_lines
from db.datasets import get_dataset
from db.session import session_scope
from workers.batch.lines import EXPIRED_CODE, EXPIRED_MESSAGE, stored_error
from workers.model_refs import inside

logger = logging.getLogger(__name__)


def _overdue(settings: Settings, now: datetime) -> list[tuple[str, BatchSpec]]:
    overdue: list[tuple[str, BatchSpec]] = []
    with session_scope(settings.database_url, readonly=True) as session:
        for job in queued_batches(session):
            try:
                spec = BatchSpec.model_validate(job.spec)
            except ValidationError:
                logger.warning("batch %s has an unreadable spec; not expiring it", job.id)
                continue
            if job.created_at + spec.window <= now:
                overdue.append((job.id, spec))
    return overdue


def _requests(settings: Settings, job_id: str, dataset_id: str) -> list[dict[str, Any]]:
    """The job's request lines, or none when its file is gone (the job still expires)."""
    with session_scope(settings.database_url, readonly=True) as session:
        ds = get_dataset(session, dataset_id)
        if ds is None:
            logger.warning(
                "batch %s: dataset %s is gone; expiring without lines", job_id, dataset_id
            )
            return []
        path, fmt = ds.path, ds.format
    try:
        return load_dataset_rows(
            artifact_store(settings).fetch(inside(settings.data_dir, path)), fmt
        )
    except (OSError, DatasetFormatError, PermanentJobError) as exc:
        logger.warning("batch %s: cannot read %s (%s); expiring without lines", job_id, path, exc)
        return []


def expire_overdue_batches(settings: Settings, now: datetime | None = None) -> int:
    """Move queued batch jobs past created_at + completion_window to `expired`, every
    line not stored by an earlier attempt getting a batch_expired error line. Returns
    how many this call expired (a job a worker claims meanwhile is left to its runner)."""
    now = now or utcnow()
    expired = 0
    for job_id, spec in _overdue(settings, now):
        requests = _requests(settings, job_id, spec.input_dataset)
        with session_scope(settings.database_url) as session:
            stored = stored_lines(session, job_id)
            rows = [
                stored_error(i, r["custom_id"], EXPIRED_CODE, EXPIRED_MESSAGE)
                for i, r in enumerate(requests)
                if i not in stored
            ]
            failed = sum(stored.values())
            counts = {
                "total": max(len(requests), len(stored)),
                "completed": len(stored) - failed,
                "failed": failed + len(rows),
            }
            message = f"completion window {spec.completion_window} passed while queued"
            if expire_queued(
                session, job_id, rows, result={"request_counts": counts}, message=message
            ):
                expired += 1
                logger.info("batch %s expired while queued (%d lines)", job_id, counts["total"])
    return expired
