"""Jobs written straight through the repository, for tests below the API."""

from __future__ import annotations

from core.enums import JobKind
from db.jobs import create_job, get_job
from db.models import DEFAULT_TENANT, Job
from db.session import session_scope


def insert_job(
    database_url: str,
    max_attempts: int = 3,
    kind: JobKind = JobKind.GENERATE,
    tenant_id: str = DEFAULT_TENANT,
) -> str:
    """A queued job (generation unless `kind` says otherwise); returns its id."""
    spec = {"model": "m", "prompts": ["p"]} if kind is JobKind.GENERATE else {}
    with session_scope(database_url) as s:
        return create_job(
            s,
            tenant_id=tenant_id,
            kind=kind,
            spec=spec,
            priority=0,
            max_attempts=max_attempts,
            metadata={},
        ).id


def load_job(database_url: str, job_id: str) -> Job:
    with session_scope(database_url) as s:
        job = get_job(s, job_id)
        assert job is not None
        return job
