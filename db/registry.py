"""The model registry: fine-tuned models and adapters, by name."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.enums import FineTuneTask
from core.errors import NotFoundError
from db.base import newer_first_before
from db.models import DEFAULT_TENANT, RegisteredModel

REGISTRY_PREFIX = "ft:"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def is_registry_name(ref: str) -> bool:
    return ref.startswith(REGISTRY_PREFIX)


def model_name(base_model: str, task: FineTuneTask, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:<suffix>:<job id>`; the base is its last path component. The whole job
    id (not a prefix of it) makes the name unique, so registering never collides."""
    base = _UNSAFE.sub("-", base_model.rstrip("/").rsplit("/", 1)[-1]) or "model"
    unique = _UNSAFE.sub("-", job_id.removeprefix("job_"))
    return f"{REGISTRY_PREFIX}{base}:{suffix or task.value.replace('_', '-')}:{unique}"


def register_model(
    session: Session,
    *,
    tenant_id: str = DEFAULT_TENANT,
    name: str,
    base_model: str,
    task: str,
    method: str,
    adapter: bool,
    job_id: str,
    path: str,
    labels: list[str],
    metrics: dict[str, Any],
) -> RegisteredModel:
    model = RegisteredModel(
        name=name,
        tenant_id=tenant_id,
        base_model=base_model,
        task=task,
        method=method,
        adapter=adapter,
        job_id=job_id,
        path=path,
        labels=labels,
        metrics=metrics,
    )
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, name: str, tenant_id: str | None = None) -> RegisteredModel | None:
    """The model, or None when it does not exist or belongs to another tenant than
    `tenant_id` (None: any tenant)."""
    model = session.get(RegisteredModel, name)
    if model is None or (tenant_id is not None and model.tenant_id != tenant_id):
        return None
    return model


def require_model(session: Session, name: str, *, tenant_id: str | None) -> RegisteredModel:
    model = get_model(session, name, tenant_id)
    if model is None:
        raise NotFoundError(f"no registered model {name!r}", param="model")
    return model


def list_models(
    session: Session,
    *,
    tenant_id: str,
    limit: int | None,
    before: tuple[datetime, str] | None = None,
) -> Sequence[RegisteredModel]:
    """Newest first; `limit` None: all of them."""
    stmt = select(RegisteredModel).where(
        RegisteredModel.tenant_id == tenant_id,
        *newer_first_before(RegisteredModel.created_at, RegisteredModel.name, before),
    )
    stmt = stmt.order_by(RegisteredModel.created_at.desc(), RegisteredModel.name.desc())
    return session.scalars(stmt.limit(limit)).all()


def delete_model(session: Session, name: str, *, tenant_id: str) -> RegisteredModel:
    model = require_model(session, name, tenant_id=tenant_id)
    session.delete(model)
    session.flush()
    return model


def serving_base(session: Session, ref: str, tenant_id: str | None = None) -> str:
    """The model a worker loads to serve `ref`: a LoRA adapter's base, else `ref` itself.

    Generation jobs with the same serving base can share one decode group.
    """
    seen: set[str] = set()
    while is_registry_name(ref) and ref not in seen:
        seen.add(ref)
        model = get_model(session, ref, tenant_id)
        if model is None or not model.adapter:
            return ref
        ref = model.base_model
    return ref
