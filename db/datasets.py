"""Dataset repository: the rows describing uploaded files stored under the data dir."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import NotFoundError
from db.base import newer_first_before, utcnow
from db.models import DEFAULT_TENANT, Dataset


def create_dataset(
    session: Session,
    *,
    tenant_id: str = DEFAULT_TENANT,
    dataset_id: str,
    filename: str,
    format: str,
    schema: str,
    rows: int,
    labels: list[str],
    sha256: str,
    size_bytes: int,
    path: str,
    report: dict[str, Any],
) -> Dataset:
    """Insert a dataset whose file is already in place at `path` (relative to the data dir)."""
    dataset = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        filename=filename,
        format=format,
        schema=schema,
        rows=rows,
        labels=labels,
        sha256=sha256,
        size_bytes=size_bytes,
        path=path,
        report=report,
        created_at=utcnow(),
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, dataset_id: str, tenant_id: str | None = None) -> Dataset | None:
    """The dataset, or None when it does not exist or belongs to another tenant than
    `tenant_id` (None: any tenant, for workers)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or (tenant_id is not None and dataset.tenant_id != tenant_id):
        return None
    return dataset


def require_dataset(session: Session, dataset_id: str, *, tenant_id: str | None) -> Dataset:
    dataset = get_dataset(session, dataset_id, tenant_id)
    if dataset is None:
        raise NotFoundError(f"no dataset {dataset_id!r}", param="dataset_id")
    return dataset


def list_datasets(
    session: Session,
    *,
    tenant_id: str,
    limit: int,
    before: tuple[datetime, str] | None = None,
    schemas: Collection[str] | None = None,
) -> Sequence[Dataset]:
    """The tenant's datasets (of `schemas`, when given), newest first, keyset-paginated on
    (created_at, id)."""
    stmt = select(Dataset).where(
        Dataset.tenant_id == tenant_id,
        *newer_first_before(Dataset.created_at, Dataset.id, before),
    )
    if schemas is not None:
        stmt = stmt.where(Dataset.schema.in_(list(schemas)))
    stmt = stmt.order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit)
    return session.scalars(stmt).all()


def delete_dataset(session: Session, dataset_id: str, *, tenant_id: str) -> Dataset:
    """Delete the row; the caller removes the file once the deletion is committed."""
    dataset = require_dataset(session, dataset_id, tenant_id=tenant_id)
    session.delete(dataset)
    session.flush()
    return dataset
