from __future__ import annotations

import logging
import shutil
from typing import Annotated

from fastapi import APIRouter, Query

from api.cursors import decode_cursor, encode_cursor, split_page
from api.deps import JobsRead, ModelsWrite, ReadSessionDep, SessionDep, SettingsDep
from api.installed_models import installed_models
from api.schemas import (
    InstalledModelList,
    InstalledModelOut,
    ModelDeleted,
    ModelList,
    ModelOut,
)
from core.storage import artifact_store
from db import registry

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/models", tags=["models"])
DEFAULT_PAGE = 20


@router.get("", response_model=ModelList)
def list_models(
    session: ReadSessionDep,
    who: JobsRead,
    limit: Annotated[
        int | None, Query(ge=1, le=100, description="Page size; without it (and a cursor), all.")
    ] = None,
    cursor: str | None = None,
) -> ModelList:
    """Newest first. Without `limit` or `cursor` every model in one page, as OpenAI's list
    (which its SDKs read as one page, never asking for the next)."""
    before = decode_cursor(cursor) if cursor else None
    if limit is None and before is None:
        everything = registry.list_models(session, tenant_id=who.tenant_id, limit=None)
        return ModelList(
            data=[ModelOut.of(m) for m in everything], has_more=False, next_cursor=None
        )
    limit = limit or DEFAULT_PAGE
    rows, has_more = split_page(
        registry.list_models(session, tenant_id=who.tenant_id, limit=limit + 1, before=before),
        limit,
    )
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].name) if has_more else None
    return ModelList(
        data=[ModelOut.of(m) for m in rows], has_more=has_more, next_cursor=next_cursor
    )


@router.get("/installed", response_model=InstalledModelList)
def list_installed_models(settings: SettingsDep, who: JobsRead) -> InstalledModelList:
    """The base models installed in the data dir (shared by every tenant), which jobs name
    by directory name; declared before `/{name:path}`, which would take `installed`."""
    return InstalledModelList(
        data=[
            InstalledModelOut(
                id=m.name, architectures=m.architectures, chat_template=m.chat_template
            )
            for m in installed_models(settings.models_dir)
        ]
    )


@router.get("/{name:path}", response_model=ModelOut)
def get_model(name: str, session: ReadSessionDep, who: JobsRead) -> ModelOut:
    return ModelOut.of(registry.require_model(session, name, tenant_id=who.tenant_id))


@router.delete("/{name:path}", response_model=ModelDeleted)
def delete_model(
    name: str, session: SessionDep, settings: SettingsDep, who: ModelsWrite
) -> ModelDeleted:
    model = registry.delete_model(session, name, tenant_id=who.tenant_id)
    directory = (settings.data_dir / model.path).resolve()
    who.audit(session, "model.delete", "model", name)
    session.commit()
    if directory.is_relative_to(settings.data_dir.resolve()):
        artifact_store(settings).remove(directory)
        shutil.rmtree(directory, ignore_errors=True)
    logger.info("model %s deleted", name)
    return ModelDeleted(id=name, deleted=True)
