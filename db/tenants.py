"""Tenants, their API keys and the audit log.

Keys are 256-bit random tokens, so a fast hash (SHA-256) is the right way to store
them: there is nothing to brute-force that a slow password hash would protect, and
a lookup by hash costs one indexed SELECT per request.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, bindparam, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import InvalidRequestError, NotFoundError
from db.base import utcnow
from db.models import DEFAULT_TENANT, TENANTS, ApiKey, AuditEntry, Tenant

KEY_PREFIX = "my_"
SHOWN_CHARS = 8  # of the random part, after KEY_PREFIX
SCOPES = ("jobs:read", "jobs:write", "models:write", "metrics", "admin")
LAST_USED_EVERY = timedelta(minutes=1)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(
    session: Session,
    name: str,
    *,
    tenant_id: str | None = None,
    requests_per_minute: int | None = None,
    max_queued_jobs: int | None = None,
    max_running_jobs: int | None = None,
    max_dataset_bytes: int | None = None,
) -> Tenant:
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise InvalidRequestError(f"a tenant named {name!r} exists", param="name")
    tenant = Tenant(
        name=name,
        requests_per_minute=requests_per_minute,
        max_queued_jobs=max_queued_jobs,
        max_running_jobs=max_running_jobs,
        max_dataset_bytes=max_dataset_bytes,
        created_at=utcnow(),
    )
    if tenant_id is not None:
        tenant.id = tenant_id
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:
        raise InvalidRequestError(f"a tenant named {name!r} exists", param="name") from None
    return tenant


def get_tenant(session: Session, tenant_id: str) -> Tenant | None:
    return session.get(Tenant, tenant_id)


_LOCK_QUEUED_QUOTA = (
    select(TENANTS.c.max_queued_jobs)
    .where(TENANTS.c.id == bindparam("tenant_id"))
    .with_for_update(key_share=True)
)


def lock_queued_quota(session: Session, tenant_id: str, default: int) -> int:
    """The tenant's quota of queued jobs (its own, else `default`), its row locked until the
    transaction ends (SELECT ... FOR NO KEY UPDATE on PostgreSQL; SQLite serializes writers
    anyway): checks of a quota made under it and the insert after them count each other's
    jobs. One SELECT built once: every submitted job runs it."""
    own = session.execute(_LOCK_QUEUED_QUOTA, {"tenant_id": tenant_id}).scalar()
    return default if own is None else int(own)


def require_tenant(session: Session, ref: str) -> Tenant:
    """A tenant by id or by name."""
    tenant = (
        session.get(Tenant, ref)
        or session.scalars(select(Tenant).where(Tenant.name == ref)).first()
    )
    if tenant is None:
        raise NotFoundError(f"no tenant {ref!r}", param="tenant_id")
    return tenant


def list_tenants(session: Session) -> Sequence[Tenant]:
    return session.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id)).all()


def default_tenant(session: Session) -> Tenant:
    return require_tenant(session, DEFAULT_TENANT)


@dataclass(frozen=True, slots=True)
class NewKey:
    row: ApiKey
    secret: str  # shown once, never stored


def check_scopes(scopes: Sequence[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise InvalidRequestError(
            f"scopes must be some of {', '.join(SCOPES)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
            param="scopes",
        )
    return sorted(set(scopes), key=SCOPES.index)


def create_key(session: Session, tenant_id: str, name: str, scopes: Sequence[str]) -> NewKey:
    if get_tenant(session, tenant_id) is None:
        raise NotFoundError(f"no tenant {tenant_id!r}", param="tenant_id")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        tenant_id=tenant_id,
        name=name,
        prefix=secret[: len(KEY_PREFIX) + SHOWN_CHARS],
        hash=hash_key(secret),
        scopes=check_scopes(scopes),
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return NewKey(row=row, secret=secret)


def find_key(session: Session, secret: str) -> ApiKey | None:
    """The unrevoked key whose hash matches; None for unknown and revoked keys alike."""
    stmt = select(ApiKey).where(ApiKey.hash == hash_key(secret), ApiKey.revoked_at.is_(None))
    return session.scalars(stmt).first()


def touch_key(session: Session, key_id: str, now: datetime) -> bool:
    """Set last_used_at unless it was set less than a minute ago (a conditional UPDATE,
    so concurrent requests write it at most once a minute)."""
    stmt = (
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_EVERY),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def list_keys(session: Session, tenant_id: str | None) -> Sequence[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant_id is not None:
        stmt = stmt.where(ApiKey.tenant_id == tenant_id)
    return session.scalars(stmt).all()


def revoke_key(session: Session, key_id: str, *, tenant_id: str | None) -> ApiKey:
    """Revoke a key of `tenant_id` (None: any tenant); revoking twice keeps the first time."""
    key = session.get(ApiKey, key_id)
    if key is None or (tenant_id is not None and key.tenant_id != tenant_id):
        raise NotFoundError(f"no key {key_id!r}", param="key_id")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


_INSERT_AUDIT = insert(cast(Table, AuditEntry.__table__))


def audit(
    session: Session,
    *,
    tenant_id: str,
    key_id: str | None,
    action: str,
    target_type: str,
    target_id: str,
) -> None:
    """Record an action in the caller's transaction: it is logged exactly when it happens
    (one INSERT built once; every submitted job writes one)."""
    session.execute(
        _INSERT_AUDIT,
        {
            "at": utcnow(),
            "tenant_id": tenant_id,
            "key_id": key_id,
            "action": action,
            "target_type": target_type,
            "target_id": target_id,
        },
    )


def list_audit(
    session: Session, tenant_id: str, *, limit: int, before: int | None = None
) -> Sequence[AuditEntry]:
    """The tenant's audit entries, newest first; `before` is the last id of the previous page."""
    stmt = select(AuditEntry).where(AuditEntry.tenant_id == tenant_id)
    if before is not None:
        stmt = stmt.where(AuditEntry.id < before)
    return session.scalars(stmt.order_by(AuditEntry.id.desc()).limit(limit)).all()
