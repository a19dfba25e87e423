"""Job repository. Every status change goes through `transition`, a conditional UPDATE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from core.enums import QUEUE_FOR_KIND, EventType, FailureType, JobKind, JobStatus
from core.errors import InvalidStateError, NotFoundError
from core.states import can_transition
from core.webhooks import event_for_status
from db.base import newer_first_before, utcnow
from db.clock import database_now, db_now, db_time_after, db_time_after_param
from db.events import append_event, append_events, event_row
from db.fencing import current_attempt
from db.models import DEFAULT_TENANT, JOBS, TENANTS, Job, Tenant, new_job_id
from db.webhooks import queue_delivery


def create_job(
    session: Session,
    *,
    tenant_id: str = DEFAULT_TENANT,
    kind: JobKind,
    spec: dict[str, Any],
    priority: int,
    max_attempts: int,
    metadata: dict[str, Any],
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    model: str | None = None,
    expires_at: datetime | None = None,
    max_runtime_s: float | None = None,
    webhook_url: str | None = None,
    webhook_events: str | None = None,
) -> Job:
    now = utcnow()
    job = Job(
        tenant_id=tenant_id,
        kind=kind.value,
        status=JobStatus.QUEUED.value,
        spec=spec,
        model=model,
        priority=priority,
        max_attempts=max_attempts,
        metadata_=metadata,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        attempts=0,
        progress=0.0,
        cancel_requested=False,
        created_at=now,
        updated_at=now,
        queued_at=now,
        available_at=now,
        expires_at=expires_at,
        max_runtime_s=max_runtime_s,
        webhook_url=webhook_url,
        webhook_events=webhook_events if webhook_url is not None else None,
    )
    session.add(job)
    session.flush()
    append_event(session, job.id, EventType.STATUS, "job queued", {"status": JobStatus.QUEUED})
    return job


_INSERT_JOB = insert(cast(Table, Job.__table__))


def insert_queued_job(
    session: Session,
    *,
    tenant_id: str,
    kind: JobKind,
    spec: dict[str, Any],
    priority: int,
    max_attempts: int,
    metadata: dict[str, Any],
    idempotency_key: str | None,
    request_hash: str | None,
    model: str | None,
    expires_at: datetime | None,
    max_runtime_s: float | None,
    webhook_url: str | None,
    webhook_events: str | None,
) -> dict[str, Any]:
    """`create_job` for the API's submit path: the job and its `queued` event as two
    INSERTs built once, no ORM object; returns the row's columns by attribute name
    (`metadata_` for the metadata column), as `create_job` would have set them.

    A second job with the tenant's Idempotency-Key fails here with IntegrityError."""
    now = utcnow()
    row: dict[str, Any] = {
        "id": new_job_id(),
        "tenant_id": tenant_id,
        "kind": kind.value,
        "status": JobStatus.QUEUED.value,
        "spec": spec,
        "model": model,
        "priority": priority,
        "max_attempts": max_attempts,
        "metadata": metadata,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "attempts": 0,
        "handbacks": 0,
        "progress": 0.0,
        "cancel_requested": False,
        "pause_requested": False,
        "created_at": now,
        "updated_at": now,
        "queued_at": now,
        "available_at": now,
        "expires_at": expires_at,
        "max_runtime_s": max_runtime_s,
        "webhook_url": webhook_url,
        "webhook_events": webhook_events if webhook_url is not None else None,
    }
    session.execute(_INSERT_JOB, row)
    append_event(session, row["id"], EventType.STATUS, "job queued", {"status": JobStatus.QUEUED})
    row["metadata_"] = row.pop("metadata")
    return row


def get_job(session: Session, job_id: str, tenant_id: str | None = None) -> Job | None:
    """The job, or None when it does not exist or belongs to another tenant than
    `tenant_id` (None: any tenant, for workers)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        return None
    return job


def require_job(session: Session, job_id: str, *, tenant_id: str | None) -> Job:
    """The job; another tenant's job is the same NotFoundError as a missing one."""
    job = get_job(session, job_id, tenant_id)
    if job is None:
        raise NotFoundError(f"no job {job_id!r}", param="job_id")
    return job


def find_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    stmt = select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
    return session.scalars(stmt).first()


_COUNT_QUEUED = select(func.count(JOBS.c.id)).where(
    JOBS.c.tenant_id == bindparam("tenant_id"), JOBS.c.status == JobStatus.QUEUED.value
)


def count_queued(session: Session, tenant_id: str) -> int:
    """The tenant's queued jobs (one SELECT built once: every submitted job runs it)."""
    return int(session.execute(_COUNT_QUEUED, {"tenant_id": tenant_id}).scalar() or 0)


@dataclass(frozen=True, slots=True)
class JobFilter:
    status: JobStatus | None = None
    kind: JobKind | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def list_jobs(
    session: Session,
    filt: JobFilter,
    *,
    tenant_id: str,
    limit: int,
    before: tuple[datetime, str] | None = None,
) -> Sequence[Job]:
    """The tenant's jobs, newest first, keyset-paginated on (created_at, id)."""
    conds: list[ColumnElement[bool]] = [Job.tenant_id == tenant_id]
    if filt.status is not None:
        conds.append(Job.status == filt.status.value)
    if filt.kind is not None:
        conds.append(Job.kind == filt.kind.value)
    if filt.created_after is not None:
        conds.append(Job.created_at >= filt.created_after)
    if filt.created_before is not None:
        conds.append(Job.created_at < filt.created_before)
    for key, value in filt.metadata.items():
        conds.append(Job.metadata_[key].as_string() == value)
    conds.extend(newer_first_before(Job.created_at, Job.id, before))
    stmt = select(Job).where(*conds).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    return session.scalars(stmt).all()


def transition(
    session: Session,
    job_id: str,
    source: JobStatus,
    target: JobStatus,
    *,
    where: Sequence[ColumnElement[bool]] = (),
    values: dict[str, Any] | None = None,
    message: str = "",
    data: dict[str, Any] | None = None,
) -> bool:
    """Compare-and-set `source -> target`; True when this caller won.

    The state machine in core.states decides what is allowed; `where` adds the
    caller's own conditions (lease owner, lease expiry, cancel flag).
    """
    won = _transition(session, job_id, source, target, where, values, message, data, (Job.id,))
    return won is not None


def _transition(
    session: Session,
    job_id: str,
    source: JobStatus,
    target: JobStatus,
    where: Sequence[ColumnElement[bool]],
    values: dict[str, Any] | None,
    message: str,
    data: dict[str, Any] | None,
    returning: Sequence[Any],
) -> tuple[Any, ...] | None:
    """The compare-and-set as one UPDATE ... RETURNING `returning`; None when it lost.

    The UPDATE also returns the job's webhook_url (set once, at creation), so a job without
    a webhook skips the delivery's INSERT ... SELECT, which would insert nothing."""
    if not can_transition(source, target):
        raise InvalidStateError(f"transition {source} -> {target} is not allowed")
    now = utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == source.value, *where)
        .values(status=target.value, updated_at=now, **(values or {}))
        .returning(*returning, Job.webhook_url)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(stmt).first()
    return _recorded(session, row, job_id, source, target, message, data)


def _recorded(
    session: Session,
    row: Sequence[Any] | None,
    job_id: str,
    source: JobStatus,
    target: JobStatus,
    message: str,
    data: dict[str, Any] | None,
) -> tuple[Any, ...] | None:
    """After a compare-and-set's UPDATE (`row`: what it returned, webhook_url last; None
    when it lost): its status event and, for a job subscribed to it, its webhook delivery."""
    if row is None:
        return None
    *returned, webhook_url = row
    event_data = {"from": source.value, "status": target.value, **(data or {})}
    append_event(session, job_id, EventType.STATUS, message or f"{source} -> {target}", event_data)
    hook = event_for_status(target.value)
    if hook is not None and webhook_url is not None:
        queue_delivery(session, job_id, hook, event_data)
    return tuple(returned)


class PreparedTransition:
    """A compare-and-set `source -> target` on the jobs table, built once.

    `where` and `values` refer to their run-time values through bind parameters (their
    names must differ from the columns'); each call passes them in a dict with `job_id`
    and `now`. Executing a statement built once skips building it, computing its cache
    key and the ORM's bulk-update path, most of a hot-path UPDATE's CPU cost."""

    def __init__(
        self,
        source: JobStatus,
        target: JobStatus,
        where: Sequence[ColumnElement[bool]] = (),
        values: dict[str, Any] | None = None,
        returning: Sequence[Any] = (),
    ) -> None:
        if not can_transition(source, target):
            raise InvalidStateError(f"transition {source} -> {target} is not allowed")
        self.source = source
        self.target = target
        self.statement = (
            update(JOBS)
            .where(JOBS.c.id == bindparam("job_id"), JOBS.c.status == source.value, *where)
            .values(
                status=target.value,
                updated_at=bindparam("now", type_=JOBS.c.updated_at.type),
                **(values or {}),
            )
            .returning(*returning, JOBS.c.webhook_url)
        )

    def __call__(
        self,
        session: Session,
        job_id: str,
        params: dict[str, Any],
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> tuple[Any, ...] | None:
        """Run it for `job_id`; what it returned (without webhook_url), None when it lost."""
        row = session.execute(self.statement, {"job_id": job_id, "now": utcnow(), **params}).first()
        return _recorded(session, row, job_id, self.source, self.target, message, data)


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    kind: str
    spec: dict[str, Any]
    attempts: int
    model: str | None
    max_runtime_s: float | None = None
    tenant_id: str = DEFAULT_TENANT


def not_expired(now: datetime | ColumnElement[datetime]) -> ColumnElement[bool]:
    """On the table's column, so a statement built on the table stays free of the ORM."""
    return or_(JOBS.c.expires_at.is_(None), JOBS.c.expires_at > now)


_TENANT_CAP = (
    select(JOBS.c.tenant_id, TENANTS.c.max_running_jobs)
    .select_from(JOBS.outerjoin(TENANTS, TENANTS.c.id == JOBS.c.tenant_id))
    .where(JOBS.c.id == bindparam("job_id"))
)
_LOCK_TENANT = select(TENANTS.c.id).where(TENANTS.c.id == bindparam("tenant_id")).with_for_update()


def tenant_running_cap(
    session: Session, job_id: str, default_cap: int | None
) -> tuple[str, int] | None:
    """The (tenant, cap) the claim of `job_id` must keep under its cap of running jobs (the
    tenant's own `max_running_jobs`, else `default_cap`); None: no cap (or no job).

    With a cap, the tenant row is locked (SELECT ... FOR UPDATE on PostgreSQL; SQLite
    serializes writers anyway) until the claim commits, so two workers claiming two jobs
    of one tenant count each other's running job: the cap can't be overshot."""
    found = session.execute(_TENANT_CAP, {"job_id": job_id}).first()
    if found is None:
        return None
    tenant_id, own = found  # one query on the claim's hot path, cap or not
    cap = own if own is not None else default_cap
    if cap is None:
        return None
    session.execute(_LOCK_TENANT, {"tenant_id": tenant_id})
    return str(tenant_id), int(cap)


_CLAIM_COLUMNS = (Job.kind, Job.spec, Job.attempts, Job.model, Job.max_runtime_s, Job.tenant_id)


def _claim_transition(capped: bool, only_uncapped: bool = False) -> PreparedTransition:
    """queued -> running for the worker `worker` with a lease of `ttl_s` (unless cancelled,
    not yet due or past its expires_at; with `capped`, unless the tenant `capped_tenant`
    has `cap` running jobs; with `only_uncapped`, unless its tenant has a cap of its own),
    all by the database's clock."""
    now = db_now()
    where = [
        JOBS.c.cancel_requested.is_(False),
        JOBS.c.available_at <= now,
        not_expired(now),
    ]
    if only_uncapped:
        where.append(
            ~select(TENANTS.c.id)
            .where(TENANTS.c.id == JOBS.c.tenant_id, TENANTS.c.max_running_jobs.is_not(None))
            .exists()
        )
    if capped:
        other = JOBS.alias("other")
        running = (
            select(func.count(other.c.id))
            .where(
                other.c.tenant_id == bindparam("capped_tenant"),
                other.c.status == JobStatus.RUNNING.value,
            )
            .scalar_subquery()
        )
        where.append(running < bindparam("cap"))
    return PreparedTransition(
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        where,
        {
            "lease_owner": bindparam("worker"),
            "lease_expires_at": db_time_after_param("ttl_s"),
            "attempts": JOBS.c.attempts + 1,
            "started_at": bindparam("now", type_=JOBS.c.started_at.type),
            "progress": 0.0,
        },
        [JOBS.c[column.key] for column in _CLAIM_COLUMNS],
    )


_CLAIM = _claim_transition(capped=False)
# The claim when the workers set no default cap: one statement for a tenant without a cap
# of its own (the usual case); it claims nothing for a capped tenant's job, which then
# takes the locked path.
_CLAIM_UNCAPPED = _claim_transition(capped=False, only_uncapped=True)
_CLAIM_CAPPED = _claim_transition(capped=True)


def claim(
    session: Session,
    job_id: str,
    worker: str,
    lease_ttl: timedelta,
    default_running_cap: int | None = None,
) -> ClaimedRow | None:
    """queued -> running for `worker` (unless cancelled, not yet due, past its expires_at
    or its tenant is at its running-jobs cap), returning what a worker needs to run it."""
    params: dict[str, Any] = {"worker": worker, "ttl_s": lease_ttl.total_seconds()}
    message, data = f"claimed by {worker}", {"worker": worker}
    if default_running_cap is None:
        row = _CLAIM_UNCAPPED(session, job_id, params, message, data)
        if row is not None:
            return _claimed_row(row)
        # not claimable, or its tenant has a cap: the capped path tells which
    cap = tenant_running_cap(session, job_id, default_running_cap)
    if cap is not None:
        params["capped_tenant"], params["cap"] = cap
    row = (_CLAIM if cap is None else _CLAIM_CAPPED)(session, job_id, params, message, data)
    return None if row is None else _claimed_row(row)


def _claimed_row(row: Sequence[Any]) -> ClaimedRow:
    kind, spec, attempts, model, max_runtime_s, tenant_id = tuple(row)
    return ClaimedRow(
        kind=kind,
        spec=dict(spec),
        attempts=int(attempts),
        model=model,
        max_runtime_s=None if max_runtime_s is None else float(max_runtime_s),
        tenant_id=str(tenant_id),
    )


def claim_many(
    session: Session,
    job_ids: Sequence[str],
    worker: str,
    lease_ttl: timedelta,
    default_running_cap: int | None = None,
    *,
    note: str | None = None,
) -> dict[str, ClaimedRow]:
    """`claim` for several jobs in one transaction: the jobs of tenants without a running-jobs
    cap in one UPDATE ... RETURNING and one INSERT of their events, the others one at a time
    (each claim then counts the ones before it). Returns the claimed jobs by id, in the order
    of `job_ids`; the others are no longer claimable (another worker has them, cancelled, at
    their tenant's cap, ...). `note`, when given, is a log event recorded after each claim."""
    if not job_ids:
        return {}
    capped: set[str] = set()
    if default_running_cap is None:
        capped = set(
            session.scalars(
                select(Job.id)
                .join(Tenant, Tenant.id == Job.tenant_id)
                .where(Job.id.in_(job_ids), Tenant.max_running_jobs.is_not(None))
            )
        )
    else:
        capped = set(job_ids)
    free = [job_id for job_id in job_ids if job_id not in capped]
    claimed: dict[str, ClaimedRow] = {}
    if free:
        now = db_now()
        started = utcnow()
        stmt = (
            update(Job)
            .where(
                Job.id.in_(free),
                Job.status == JobStatus.QUEUED.value,
                Job.cancel_requested.is_(False),
                Job.available_at <= now,
                not_expired(now),
            )
            .values(
                status=JobStatus.RUNNING.value,
                updated_at=started,
                lease_owner=worker,
                lease_expires_at=db_time_after(lease_ttl.total_seconds()),
                attempts=Job.attempts + 1,
                started_at=started,
                progress=0.0,
            )
            .returning(Job.id, Job.webhook_events, *_CLAIM_COLUMNS)
            .execution_options(synchronize_session=False)
        )
        rows: dict[str, ClaimedRow] = {}
        subscribed: dict[str, str] = {}  # job id -> its webhook's events, where it has one
        for row in session.execute(stmt):
            rows[str(row[0])] = _claimed_row(row[2:])
            if row[1]:
                subscribed[str(row[0])] = row[1]
        data = {"from": JobStatus.QUEUED.value, "status": JobStatus.RUNNING.value, "worker": worker}
        events = [
            event_row(job_id, EventType.STATUS, f"claimed by {worker}", data) for job_id in rows
        ]
        if note is not None:
            events += [
                event_row(job_id, EventType.LOG, note, {"worker": worker}) for job_id in rows
            ]
        append_events(session, events)
        hook = event_for_status(JobStatus.RUNNING.value)
        if hook is not None:  # only the jobs subscribed to it: no INSERT ... SELECT per job
            for job_id, subscription in subscribed.items():
                if f",{hook.value}," in subscription:
                    queue_delivery(session, job_id, hook, data)
        claimed.update(rows)
    for job_id in job_ids:
        if job_id in capped:
            one = claim(session, job_id, worker, lease_ttl, default_running_cap)
            if one is not None:
                claimed[job_id] = one
                if note is not None:
                    append_event(session, job_id, EventType.LOG, note, {"worker": worker})
    return {job_id: claimed[job_id] for job_id in job_ids if job_id in claimed}


def claim_job(session: Session, job_id: str, worker: str, lease_ttl: timedelta) -> bool:
    """queued -> running for `worker`, unless cancelled or not yet due."""
    return claim(session, job_id, worker, lease_ttl) is not None


@dataclass(frozen=True, slots=True)
class LeaseState:
    held: bool
    cancel_requested: bool
    pause_requested: bool = False


def renew_lease(
    session: Session,
    job_id: str,
    attempt: int,
    lease_ttl: timedelta,
    progress: float | None,
    detail: dict[str, Any] | None = None,
) -> LeaseState:
    values: dict[str, Any] = {
        "lease_expires_at": db_time_after(lease_ttl.total_seconds()),
        "updated_at": utcnow(),
    }
    if progress is not None:
        values["progress"] = progress
    if detail:
        values["progress_detail"] = detail
    stmt = (
        update(Job)
        .where(*current_attempt(job_id, attempt))
        .values(**values)
        .returning(Job.cancel_requested, Job.pause_requested)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(stmt).first()
    if row is None:
        return LeaseState(held=False, cancel_requested=False)
    return LeaseState(held=True, cancel_requested=bool(row[0]), pause_requested=bool(row[1]))


def expire_overdue(session: Session, job_id: str, now: datetime) -> bool:
    """queued -> expired when the job's expires_at has passed; False otherwise."""
    return transition(
        session,
        job_id,
        JobStatus.QUEUED,
        JobStatus.EXPIRED,
        where=[Job.expires_at.is_not(None), Job.expires_at <= now],
        values={
            "finished_at": now,
            "error_type": FailureType.EXPIRED.value,
            "error_message": "expires_at passed while the job was queued; it never started",
        },
        message="expired while queued (expires_at passed)",
        data={"error_type": FailureType.EXPIRED.value},
    )


def overdue_queued(session: Session, now: datetime, limit: int = 1000) -> Sequence[str]:
    """Ids of queued jobs whose expires_at has passed."""
    stmt = (
        select(Job.id)
        .where(
            Job.status == JobStatus.QUEUED.value,
            Job.expires_at.is_not(None),
            Job.expires_at <= now,
        )
        .order_by(Job.expires_at)
        .limit(limit)
    )
    return session.scalars(stmt).all()


def _running_and_cap(default_running_cap: int | None) -> tuple[Any, ColumnElement[Any]]:
    """Running jobs per tenant (a subquery: tenant_id, n) and each tenant's cap on them."""
    other = aliased(Job)
    running = (
        select(other.tenant_id, func.count(other.id).label("n"))
        .where(other.status == JobStatus.RUNNING.value)
        .group_by(other.tenant_id)
        .subquery()
    )
    cap: ColumnElement[Any] = (
        Tenant.max_running_jobs.expression
        if default_running_cap is None
        else func.coalesce(Tenant.max_running_jobs, default_running_cap)
    )
    return running, cap


def capped_tenants(default_running_cap: int | None) -> Any:
    """Ids of tenants at their running-jobs cap (their own, else `default_running_cap`):
    no worker may claim their queued jobs until one of their running jobs ends."""
    running, cap = _running_and_cap(default_running_cap)
    return (
        select(Tenant.id).join(running, running.c.tenant_id == Tenant.id).where(running.c.n >= cap)
    )


def count_waiting(
    session: Session,
    kinds: Sequence[JobKind],
    waiting_since: datetime,
    default_running_cap: int | None = None,
) -> int:
    """Queued jobs of `kinds` that have been due, uncancelled and unexpired since
    `waiting_since` or longer and that a worker may claim (their tenant is below its
    running cap): work an idle worker on their queue should have taken."""
    if not kinds:
        return 0
    stmt = select(func.count(Job.id)).where(
        Job.status == JobStatus.QUEUED.value,
        Job.kind.in_([k.value for k in kinds]),
        Job.cancel_requested.is_(False),
        Job.available_at <= waiting_since,
        Job.queued_at <= waiting_since,
        not_expired(db_now()),
        Job.tenant_id.not_in(capped_tenants(default_running_cap)),
    )
    return int(session.scalar(stmt) or 0)


def request_cancel(session: Session, job_id: str, *, tenant_id: str | None) -> Job:
    """Cancel a queued job now; flag a running one for its worker to stop."""
    for _ in range(5):
        job = require_job(session, job_id, tenant_id=tenant_id)
        status = JobStatus(job.status)
        if status is JobStatus.CANCELLED:
            return job
        if status in (JobStatus.QUEUED, JobStatus.PAUSED):
            if transition(
                session,
                job_id,
                status,
                JobStatus.CANCELLED,
                values={"finished_at": utcnow(), "cancel_requested": True},
                message=f"cancelled while {status.value}",
            ):
                return require_job(session, job_id, tenant_id=tenant_id)
            continue
        if status is JobStatus.RUNNING:
            if job.cancel_requested:
                return job
            stmt = (
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                .values(cancel_requested=True, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if session.execute(stmt).rowcount == 1:  # type: ignore[attr-defined]
                append_event(session, job_id, EventType.LOG, "cancel requested")
                return require_job(session, job_id, tenant_id=tenant_id)
            continue
        raise InvalidStateError(f"job {job_id} already {status.value}", param="job_id")
    raise InvalidStateError(f"job {job_id} kept changing state; try again", param="job_id")


def expired_leases(session: Session, now: datetime, limit: int = 500) -> Sequence[Job]:
    stmt = (
        select(Job)
        .where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
        .limit(limit)
    )
    return session.scalars(stmt).all()


def ready_for_model(
    session: Session, kind: JobKind, model: str, now: datetime, limit: int
) -> Sequence[str]:
    """Ids of queued, due, uncancelled jobs of `kind` on `model`, highest priority first."""
    stmt = (
        select(Job.id)
        .where(
            Job.status == JobStatus.QUEUED.value,
            Job.kind == kind.value,
            Job.model == model,
            Job.available_at <= now,
            Job.cancel_requested.is_(False),
            not_expired(now),
        )
        .order_by(Job.priority.desc(), Job.created_at)
        .limit(limit)
    )
    return session.scalars(stmt).all()


def due_queued(
    session: Session,
    now: datetime,
    grace: timedelta,
    limit: int = 1000,
    default_running_cap: int | None = None,
) -> Sequence[Job]:
    """Queued jobs that are due, unexpired and old enough that their message should have
    arrived, to republish.

    Fair across tenants: ranked within their tenant (priority, then age) and taken rank
    by rank, so every tenant's first job comes before any tenant's second, and one
    tenant's backlog cannot fill `limit`. A tenant with a running-jobs cap gets only as
    many as it has room for (cap minus running), so its waiting jobs are not sent round
    again and again only to be dropped by workers."""
    rank = (
        func.row_number()
        .over(partition_by=Job.tenant_id, order_by=(Job.priority.desc(), Job.queued_at))
        .label("rank")
    )
    ranked = (
        select(Job.id, rank)
        .where(
            Job.status == JobStatus.QUEUED.value,
            Job.available_at <= now,
            Job.queued_at <= now - grace,
            not_expired(now),
        )
        .subquery()
    )
    running, cap = _running_and_cap(default_running_cap)
    stmt = (
        select(Job)
        .join(ranked, ranked.c.id == Job.id)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .outerjoin(running, running.c.tenant_id == Job.tenant_id)
        .where(or_(cap.is_(None), ranked.c.rank <= cap - func.coalesce(running.c.n, 0)))
        .order_by(ranked.c.rank, Job.priority.desc(), Job.queued_at, Job.id)
        .limit(limit)
    )
    return session.scalars(stmt).all()


@dataclass(frozen=True, slots=True)
class QueuePlace:
    queue: str
    position: int  # 1: the next job its queue's workers take
    depth: int  # queued jobs on the queue


def queue_place(session: Session, job: Job) -> QueuePlace | None:
    """Where a queued job stands on its queue: workers take higher priority first, then
    older first. None for a job that is not queued."""
    if job.status != JobStatus.QUEUED.value:
        return None
    queue = QUEUE_FOR_KIND[JobKind(job.kind)]
    kinds = [k.value for k, q in QUEUE_FOR_KIND.items() if q == queue]
    waiting = [Job.status == JobStatus.QUEUED.value, Job.kind.in_(kinds)]
    ahead = or_(
        Job.priority > job.priority,
        and_(Job.priority == job.priority, Job.queued_at < job.queued_at),
        and_(Job.priority == job.priority, Job.queued_at == job.queued_at, Job.id < job.id),
    )
    stmt = select(func.count(Job.id), func.count(Job.id).filter(ahead)).where(*waiting)
    depth, before = session.execute(stmt).one()
    return QueuePlace(queue=queue, position=int(before) + 1, depth=int(depth))


@dataclass(frozen=True, slots=True)
class DueRetries:
    jobs: list[tuple[str, JobKind, int]]  # (id, kind, priority)
    until: datetime  # the next call's `since`


def due_retries(session: Session, since: datetime, limit: int = 1000) -> DueRetries:
    """Queued jobs whose deferred start (a retry's backoff) fell due after `since` and by
    the database's clock now: their message is published when they fall due rather than
    when the reconciler next passes. Oldest first; `until` is where the next call resumes
    (the last one taken when `limit` cut the list, else now)."""
    now = database_now(session)
    rows = session.execute(
        select(Job.id, Job.kind, Job.priority, Job.available_at)
        .where(
            Job.status == JobStatus.QUEUED.value,
            Job.available_at > since,
            Job.available_at <= now,
            Job.available_at > Job.queued_at,
            Job.cancel_requested.is_(False),
        )
        .order_by(Job.available_at)
        .limit(limit)
    ).all()
    jobs = [(str(job_id), JobKind(kind), int(priority)) for job_id, kind, priority, _ in rows]
    until = rows[-1][3] if len(rows) == limit else now
    return DueRetries(jobs, until)
