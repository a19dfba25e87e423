from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import Principal
from api.cursors import MAX_ROW_ID, decode_cursor, encode_cursor, split_page
from api.deps import (
    JobsRead,
    JobsWrite,
    PublisherDep,
    ReadSessionDep,
    SessionDep,
    SettingsDep,
    in_create_slot,
    request_session,
)
from api.job_checks import check_job_request, check_queued_quota
from api.job_files import tensorboard_archive
from api.schemas import (
    CheckpointList,
    CheckpointOut,
    EventList,
    EventOut,
    JobList,
    JobOut,
    MetricList,
    MetricOut,
    OutputList,
    OutputOut,
    QueueOut,
)
from core.dispatch import JobPublisher
from core.enums import JobKind, JobStatus
from core.errors import IdempotencyConflictError, InvalidRequestError, NotFoundError
from core.settings import Settings
from core.specs import (
    DEFAULT_WEBHOOK_EVENTS,
    AnyJobRequest,
    EmbedJobRequest,
    GenerateJobRequest,
    JobRequest,
)
from db import events as events_repo
from db import jobs as jobs_repo
from db import outputs as outputs_repo
from db import pauses as pauses_repo
from db import tenants as tenants_repo
from db import training as training_repo
from db.models import Job
from db.registry import serving_base
from db.webhooks import events_column

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
REPLAYED_HEADER = "Idempotent-Replayed"  # on an answer given again for its Idempotency-Key

IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
]


def _request_hash(req: AnyJobRequest) -> str:
    canonical = json.dumps(req.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


DateTimeQuery = Query(
    description="An RFC 3339 time with a zone, e.g. 2026-11-28T12:00:00Z",
    json_schema_extra={"format": "date-time"},
)


def _aware_time(name: str, value: str | None) -> datetime | None:
    """An ISO 8601 time with a zone; numbers and zone-less times are refused."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"{name} is not an ISO 8601 time", param=name) from None
    if parsed.tzinfo is None:
        raise InvalidRequestError(f"{name} needs a time zone (e.g. Z)", param=name)
    return parsed


def _parse_metadata_filters(values: list[str]) -> dict[str, str]:
    filters: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise InvalidRequestError("metadata filters look like key:value", param="metadata")
        filters[key] = value
    return filters


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses={
        200: {
            "model": JobOut,
            "description": "Replayed: the job an earlier request "
            "with the same Idempotency-Key created.",
        }
    },
)
async def create_job(
    req: JobRequest,
    request: Request,
    response: Response,
    who: JobsWrite,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    # The hot path: one thread-pool hop for the whole database + broker work, instead
    # of one for the session dependency's setup, one for the route, one for teardown;
    # the settings and the publisher from the app's state, not two more dependencies.
    settings: Settings = request.app.state.settings
    publisher: JobPublisher = request.app.state.publisher
    out = await in_create_slot(
        request, _create_job, req, response, settings, publisher, who, idempotency_key
    )
    # The body straight from the model it was built as (response_model still documents
    # it): FastAPI would validate the returned JobOut again and encode it in two passes.
    return Response(
        out.model_dump_json(),
        status_code=response.status_code or status.HTTP_202_ACCEPTED,
        headers=dict(response.headers),
        media_type="application/json",
    )


def _create_job(
    req: AnyJobRequest,
    response: Response,
    settings: Settings,
    publisher: JobPublisher,
    who: Principal,
    idempotency_key: str | None,
) -> JobOut:
    with request_session(settings) as session:
        return create_job_in(session, req, response, settings, publisher, who, idempotency_key)


def create_job_in(
    session: Session,
    req: AnyJobRequest,
    response: Response,
    settings: Settings,
    publisher: JobPublisher,
    who: Principal,
    idempotency_key: str | None,
) -> JobOut:
    digest = _request_hash(req)
    tenant_id = who.tenant_id
    if idempotency_key is not None:
        existing = jobs_repo.find_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replay(existing, digest, response)
    check_job_request(session, settings, req, tenant_id)
    check_queued_quota(session, settings, tenant_id)
    try:
        # A concurrent request with the same Idempotency-Key fails here, at the insert
        # (not only at the commit), and replays the job of the one that won.
        row = jobs_repo.insert_queued_job(
            session,
            tenant_id=tenant_id,
            kind=JobKind(req.kind),
            spec=req.spec.model_dump(mode="json"),
            priority=req.priority,
            max_attempts=req.max_attempts or settings.max_attempts,
            metadata=dict(req.metadata),
            idempotency_key=idempotency_key,
            request_hash=digest,
            model=_batching_model(session, req, tenant_id),
            expires_at=req.expires_at,
            max_runtime_s=req.max_runtime_s,
            webhook_url=req.webhook_url,
            webhook_events=events_column(req.webhook_events or DEFAULT_WEBHOOK_EVENTS),
        )
        tenants_repo.audit(
            session,
            tenant_id=tenant_id,
            key_id=who.key_id,
            action="job.create",
            target_type="job",
            target_id=row["id"],
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        existing = jobs_repo.find_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is None:
            raise
        return _replay(existing, digest, response)
    _publish(publisher, row["id"], row["kind"], row["priority"])
    logger.info("job %s queued (%s)", row["id"], row["kind"])
    return JobOut.of_new(row)


def _batching_model(session: Session, req: AnyJobRequest, tenant_id: str) -> str | None:
    """The Job.model a worker batches jobs by: a generation job's base model (adapters on
    it share its decode group), an embedding job's model itself."""
    if isinstance(req, GenerateJobRequest):
        return serving_base(session, req.spec.model, tenant_id)
    if isinstance(req, EmbedJobRequest):
        return req.spec.model
    return None


def _replay(existing: Job, digest: str, response: Response) -> JobOut:
    if existing.request_hash != digest:
        raise IdempotencyConflictError(
            "Idempotency-Key was already used with a different request body",
            param="Idempotency-Key",
        )
    response.status_code = status.HTTP_200_OK
    response.headers[REPLAYED_HEADER] = "true"
    return JobOut.of(existing)


@router.get("", response_model=JobList)
def list_jobs(
    session: ReadSessionDep,
    who: JobsRead,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    kind: JobKind | None = None,
    created_after: Annotated[str | None, DateTimeQuery] = None,
    created_before: Annotated[str | None, DateTimeQuery] = None,
    metadata: Annotated[list[str], Query(description="key:value, repeatable")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> JobList:
    filt = jobs_repo.JobFilter(
        status=status_,
        kind=kind,
        created_after=_aware_time("created_after", created_after),
        created_before=_aware_time("created_before", created_before),
        metadata=_parse_metadata_filters(metadata),
    )
    before = decode_cursor(cursor) if cursor else None
    rows, has_more = split_page(
        jobs_repo.list_jobs(session, filt, tenant_id=who.tenant_id, limit=limit + 1, before=before),
        limit,
    )
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more else None
    return JobList(data=[JobOut.of(j) for j in rows], has_more=has_more, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: ReadSessionDep, who: JobsRead) -> JobOut:
    job = jobs_repo.require_job(session, job_id, tenant_id=who.tenant_id)
    out = JobOut.of(job)
    place = jobs_repo.queue_place(session, job)
    if place is not None:
        out.queue = QueueOut(name=place.queue, position=place.position, depth=place.depth)
    return out


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep, publisher: PublisherDep, who: JobsWrite) -> JobOut:
    job = cancel_in(session, publisher, who, job_id)
    logger.info("job %s cancel requested (now %s)", job_id, job.status)
    return JobOut.of(job)


def cancel_in(session: Session, publisher: JobPublisher, who: Principal, job_id: str) -> Job:
    """Every route's cancel: asked (audited, committed) within the caller's tenant; for a
    running job also a cancel notice, which a decode group reads between steps (its
    heartbeat would see the database's flag only at its next beat)."""
    job = jobs_repo.request_cancel(session, job_id, tenant_id=who.tenant_id)
    who.audit(session, "job.cancel", "job", job_id)
    session.commit()
    if job.status == JobStatus.RUNNING.value:
        publisher.notify_cancel(job_id)
    return job


@router.post("/{job_id}/pause", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def pause_job(job_id: str, session: SessionDep, who: JobsWrite) -> JobOut:
    """A fine-tune only: a queued one is `paused` at once; a running one checkpoints at the
    end of its current step, then rests `paused`, holding no worker."""
    job = pauses_repo.request_pause(session, job_id, tenant_id=who.tenant_id)
    who.audit(session, "job.pause", "job", job_id)
    session.commit()
    logger.info("job %s pause requested (now %s)", job_id, job.status)
    return JobOut.of(job)


@router.post("/{job_id}/resume", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def resume_job(job_id: str, session: SessionDep, publisher: PublisherDep, who: JobsWrite) -> JobOut:
    """A paused fine-tune is queued again and continues from its latest checkpoint."""
    job = pauses_repo.resume(session, job_id, tenant_id=who.tenant_id)
    who.audit(session, "job.resume", "job", job_id)
    session.commit()
    publish_job(publisher, job)
    logger.info("job %s resumed", job_id)
    return JobOut.of(job)


def publish_job(publisher: JobPublisher, job: Job) -> None:
    """Publish a committed queued job; the reconciler does it if the broker is away."""
    _publish(publisher, job.id, job.kind, job.priority)


def _publish(publisher: JobPublisher, job_id: str, kind: str, priority: int) -> None:
    try:
        publisher.publish(job_id, JobKind(kind), priority)
    except Exception as exc:
        logger.warning("job %s accepted but not published yet: %s", job_id, type(exc).__name__)


@router.get("/{job_id}/events", response_model=EventList)
def list_job_events(
    job_id: str,
    session: ReadSessionDep,
    who: JobsRead,
    after: Annotated[int, Query(ge=0, le=MAX_ROW_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> EventList:
    jobs_repo.require_job(session, job_id, tenant_id=who.tenant_id)
    rows, has_more = split_page(
        events_repo.list_events(session, job_id, after_id=after, limit=limit + 1), limit
    )
    return EventList(
        data=[EventOut.of(e) for e in rows],
        has_more=has_more,
        last_id=rows[-1].id if rows else None,
    )


@router.get("/{job_id}/outputs", response_model=OutputList)
def list_job_outputs(job_id: str, session: ReadSessionDep, who: JobsRead) -> OutputList:
    job = jobs_repo.require_job(session, job_id, tenant_id=who.tenant_id)
    rows = outputs_repo.list_outputs(session, job_id)
    return OutputList(job_id=job_id, status=job.status, data=[OutputOut.of(o) for o in rows])


@router.get("/{job_id}/metrics", response_model=MetricList)
def list_job_metrics(
    job_id: str,
    session: ReadSessionDep,
    who: JobsRead,
    name: Annotated[list[str], Query(description="Only these metric names")] = [],  # noqa: B006
    after: Annotated[int, Query(ge=0, le=MAX_ROW_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> MetricList:
    jobs_repo.require_job(session, job_id, tenant_id=who.tenant_id)
    rows, has_more = split_page(
        training_repo.list_metrics(session, job_id, names=name, after_id=after, limit=limit + 1),
        limit,
    )
    return MetricList(
        job_id=job_id,
        data=[MetricOut.of(m) for m in rows],
        has_more=has_more,
        last_id=rows[-1].id if rows else None,
    )


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_job_checkpoints(job_id: str, session: ReadSessionDep, who: JobsRead) -> CheckpointList:
    jobs_repo.require_job(session, job_id, tenant_id=who.tenant_id)
    rows = training_repo.list_checkpoints(session, job_id)
    return CheckpointList(job_id=job_id, data=[CheckpointOut.of(c) for c in rows])


@router.get(
    "/{job_id}/tensorboard",
    response_class=Response,
    responses={200: {"content": {"application/gzip": {}}, "description": "A .tar.gz"}},
)
def download_job_tensorboard(
    job_id: str, session: ReadSessionDep, who: JobsRead, settings: SettingsDep
) -> Response:
    """The job's TensorBoard event files (fine-tunes with `tracking: ["tensorboard"]` or the
    deployment's `MODELYARD_TRACKING`), one run per attempt: `tensorboard --logdir` the
    unpacked folder, or `modelyard tensorboard JOB`."""
    job = jobs_repo.require_job(session, job_id, tenant_id=who.tenant_id)
    archive = tensorboard_archive(settings, job.id, job.tenant_id, job.attempts)
    if archive is None:
        raise NotFoundError(
            f"job {job_id} has no TensorBoard files: tracking was off for it, or it has not "
            "trained yet"
        )
    return Response(
        archive,
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-tensorboard.tar.gz"'},
    )
