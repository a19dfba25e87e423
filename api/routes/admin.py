"""Tenants, API keys and the audit log (the `admin` scope).

An admin key manages its own tenant's keys and reads its audit log; an admin key of
the `default` tenant (the operator's) also creates tenants and their keys.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from pydantic import BaseModel, Field

from api.auth import KeyCache, Principal
from api.deps import Admin, ReadSessionDep, SessionDep
from core.errors import PermissionDeniedError
from db import tenants as repo
from db.models import ApiKey, AuditEntry, Tenant

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["admin"])

Name = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Quota = Annotated[int | None, Field(ge=1, le=2**31 - 1)]


class TenantIn(BaseModel):
    name: Name
    requests_per_minute: Quota = None
    max_queued_jobs: Quota = None
    max_running_jobs: Quota = None
    max_dataset_bytes: Quota = None


class TenantOut(BaseModel):
    id: str
    name: str
    requests_per_minute: int | None
    max_queued_jobs: int | None
    max_running_jobs: int | None
    max_dataset_bytes: int | None
    created_at: datetime

    @classmethod
    def of(cls, row: Tenant) -> TenantOut:
        return cls(
            id=row.id,
            name=row.name,
            requests_per_minute=row.requests_per_minute,
            max_queued_jobs=row.max_queued_jobs,
            max_running_jobs=row.max_running_jobs,
            max_dataset_bytes=row.max_dataset_bytes,
            created_at=row.created_at,
        )


class TenantList(BaseModel):
    data: list[TenantOut]


class KeyIn(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=255)]
    scopes: Annotated[list[str], Field(min_length=1, max_length=len(repo.SCOPES))]
    tenant_id: Annotated[str | None, Field(max_length=64)] = None


class KeyOut(BaseModel):
    id: str
    tenant_id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyOut:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            name=row.name,
            prefix=row.prefix,
            scopes=list(row.scopes),
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
        )


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself: shown only in this answer, store it now.")


class KeyList(BaseModel):
    data: list[KeyOut]


class AuditOut(BaseModel):
    id: int
    at: datetime
    tenant_id: str
    key_id: str | None
    action: str
    target_type: str
    target_id: str

    @classmethod
    def of(cls, row: AuditEntry) -> AuditOut:
        return cls(
            id=row.id,
            at=row.at,
            tenant_id=row.tenant_id,
            key_id=row.key_id,
            action=row.action,
            target_type=row.target_type,
            target_id=row.target_id,
        )


class AuditList(BaseModel):
    data: list[AuditOut]
    has_more: bool
    last_id: int | None


def _tenant_for(who: Principal, tenant_id: str | None) -> str:
    """The tenant an admin acts on: its own, or any other for the operator."""
    if tenant_id is None or tenant_id == who.tenant_id:
        return who.tenant_id
    if not who.operator:
        raise PermissionDeniedError("only an admin key of the default tenant manages others")
    return tenant_id


def _operator(who: Principal) -> None:
    if not who.operator:
        raise PermissionDeniedError("only an admin key of the default tenant manages tenants")


@router.post("/admin/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantOut)
def create_tenant(body: TenantIn, session: SessionDep, who: Admin) -> TenantOut:
    _operator(who)
    tenant = repo.create_tenant(
        session,
        body.name,
        requests_per_minute=body.requests_per_minute,
        max_queued_jobs=body.max_queued_jobs,
        max_running_jobs=body.max_running_jobs,
        max_dataset_bytes=body.max_dataset_bytes,
    )
    who.audit(session, "tenant.create", "tenant", tenant.id)
    session.commit()
    logger.info("tenant %s created", tenant.id)
    return TenantOut.of(tenant)


@router.get("/admin/tenants", response_model=TenantList)
def list_tenants(session: ReadSessionDep, who: Admin) -> TenantList:
    _operator(who)
    return TenantList(data=[TenantOut.of(t) for t in repo.list_tenants(session)])


@router.post("/admin/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def create_key(body: KeyIn, session: SessionDep, who: Admin) -> KeyCreated:
    tenant_id = _tenant_for(who, body.tenant_id)
    new = repo.create_key(session, tenant_id, body.name, body.scopes)
    repo.audit(
        session,
        tenant_id=tenant_id,
        key_id=who.key_id,
        action="key.create",
        target_type="api_key",
        target_id=new.row.id,
    )
    session.commit()
    logger.info("api key %s (%s) created for tenant %s", new.row.id, new.row.prefix, tenant_id)
    return KeyCreated(**KeyOut.of(new.row).model_dump(), key=new.secret)


@router.get("/admin/keys", response_model=KeyList)
def list_keys(
    session: ReadSessionDep,
    who: Admin,
    tenant_id: Annotated[str | None, Query(max_length=64)] = None,
) -> KeyList:
    rows = repo.list_keys(session, _tenant_for(who, tenant_id))
    return KeyList(data=[KeyOut.of(k) for k in rows])


@router.delete("/admin/keys/{key_id}", response_model=KeyOut)
def revoke_key(key_id: str, request: Request, session: SessionDep, who: Admin) -> KeyOut:
    key = repo.revoke_key(session, key_id, tenant_id=None if who.operator else who.tenant_id)
    repo.audit(
        session,
        tenant_id=key.tenant_id,
        key_id=who.key_id,
        action="key.revoke",
        target_type="api_key",
        target_id=key.id,
    )
    session.commit()
    key_cache: KeyCache = request.app.state.key_cache
    key_cache.forget(key.id)  # other API processes: within settings.api_key_cache_s
    logger.info("api key %s revoked", key.id)
    return KeyOut.of(key)


@router.get("/audit", response_model=AuditList)
def list_audit(
    session: ReadSessionDep,
    who: Admin,
    tenant_id: Annotated[str | None, Query(max_length=64)] = None,
    before: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AuditList:
    """The tenant's audit log, newest first: who (key) created, cancelled or deleted what.
    Page back with `before` = the previous page's `last_id`."""
    rows = list(
        repo.list_audit(session, _tenant_for(who, tenant_id), limit=limit + 1, before=before)
    )
    has_more = len(rows) > limit
    rows = rows[:limit]
    return AuditList(
        data=[AuditOut.of(r) for r in rows],
        has_more=has_more,
        last_id=rows[-1].id if rows else None,
    )
