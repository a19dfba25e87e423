"""Dataset uploads: validated in full before anything is stored, then file first, row second."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from sqlalchemy.orm import Session

from api.auth import Principal
from api.cursors import decode_cursor, encode_cursor, split_page
from api.dataset_tokens import dataset_tokens
from api.deps import JobsRead, JobsWrite, ReadSessionDep, SessionDep, SettingsDep
from api.schemas import DatasetList, DatasetOut, DatasetTokensOut
from core.datasets import ParsedDataset, display_filename, parse_dataset
from core.errors import PayloadTooLargeError
from core.settings import Settings
from core.specs import MODEL_REF_PATTERN
from core.storage import artifact_store
from db import datasets as datasets_repo
from db import tenants as tenants_repo
from db.models import Dataset, new_dataset_id

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

DATASETS_DIR = "datasets"


def dataset_dir(tenant_id: str, dataset_id: str) -> str:
    """Where a dataset's file lives, relative to the data dir: built from server-made ids
    only (the uploaded file's name is recorded, never used as a path)."""
    return f"tenants/{tenant_id}/{DATASETS_DIR}/{dataset_id}"


def _write_file(path: Path, raw: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: `path` is never half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_dataset_dir(settings: Settings, relative_dir: str) -> None:
    root = settings.data_dir.resolve()
    directory = (root / relative_dir).resolve()
    if not directory.is_relative_to(root) or directory == root:
        logger.warning("dataset directory %s is outside the data dir; not removed", relative_dir)
        return
    try:
        artifact_store(settings).remove(directory)
        shutil.rmtree(directory)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove dataset directory %s: %s", directory, exc)


def _max_dataset_bytes(session: Session, settings: Settings, tenant_id: str) -> int:
    tenant = tenants_repo.get_tenant(session, tenant_id)
    if tenant is not None and tenant.max_dataset_bytes is not None:
        return tenant.max_dataset_bytes
    return settings.max_dataset_bytes or settings.max_upload_bytes


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut)
def upload_dataset(
    session: SessionDep,
    settings: SettingsDep,
    who: JobsWrite,
    file: Annotated[UploadFile, File(description="JSON Lines, CSV (text,label) or CoNLL/BIO file")],
    name: Annotated[
        str | None, Form(max_length=255, description="Filename to record instead of the upload's")
    ] = None,
) -> DatasetOut:
    return DatasetOut.of(store_dataset(session, settings, who, file, name))


def store_dataset(
    session: Session,
    settings: Settings,
    who: Principal,
    file: UploadFile,
    name: str | None,
    check: Callable[[ParsedDataset], None] | None = None,
) -> Dataset:
    """Parse and validate the upload (and `check` it), then store the file and commit its
    row; a refused upload stores nothing."""
    limit = _max_dataset_bytes(session, settings, who.tenant_id)
    raw = file.file.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLargeError(f"dataset exceeds this tenant's limit of {limit} bytes")
    filename = display_filename(name or file.filename)
    parsed = parse_dataset(raw, filename)
    if check is not None:
        check(parsed)
    dataset_id = new_dataset_id()
    stored_name = f"data.{parsed.format.value}"
    relative_dir = dataset_dir(who.tenant_id, dataset_id)
    directory = settings.data_dir.resolve() / relative_dir
    directory.mkdir(parents=True)
    try:
        _write_file(directory / stored_name, raw)
        dataset = datasets_repo.create_dataset(
            session,
            tenant_id=who.tenant_id,
            dataset_id=dataset_id,
            filename=filename or stored_name,
            format=parsed.format.value,
            schema=parsed.schema.value,
            rows=len(parsed.rows),
            labels=parsed.labels,
            sha256=hashlib.sha256(raw).hexdigest(),
            size_bytes=len(raw),
            path=f"{relative_dir}/{stored_name}",
            report=parsed.report,
        )
        artifact_store(settings).publish(directory)
        who.audit(session, "dataset.create", "dataset", dataset_id)
        session.commit()
    except BaseException:
        session.rollback()
        _remove_dataset_dir(settings, relative_dir)
        raise
    logger.info(
        "dataset %s stored: %s, %s, %d rows, %d warnings",
        dataset_id,
        parsed.format.value,
        parsed.schema.value,
        len(parsed.rows),
        parsed.report["warnings_total"],
    )
    return dataset


@router.get("", response_model=DatasetList)
def list_datasets(
    session: ReadSessionDep,
    who: JobsRead,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> DatasetList:
    before = decode_cursor(cursor) if cursor else None
    rows, has_more = split_page(
        datasets_repo.list_datasets(
            session, tenant_id=who.tenant_id, limit=limit + 1, before=before
        ),
        limit,
    )
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more else None
    return DatasetList(
        data=[DatasetOut.of(d) for d in rows], has_more=has_more, next_cursor=next_cursor
    )


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: ReadSessionDep, who: JobsRead) -> DatasetOut:
    return DatasetOut.of(
        datasets_repo.require_dataset(session, dataset_id, tenant_id=who.tenant_id)
    )


@router.get("/{dataset_id}/tokens", response_model=DatasetTokensOut)
def count_dataset_tokens(
    dataset_id: str,
    session: ReadSessionDep,
    settings: SettingsDep,
    who: JobsRead,
    model: Annotated[
        str,
        Query(
            pattern=MODEL_REF_PATTERN,
            description="An installed base model (its directory under models/) or a "
            "registered model (ft:...) whose tokenizer counts.",
        ),
    ],
    max_length: Annotated[
        int | None,
        Query(
            ge=8,
            le=4096,
            description="Where training cuts an example, as hyperparameters.max_length "
            "(default: its default, or the model's context when that is shorter).",
        ),
    ] = None,
) -> DatasetTokensOut:
    dataset = datasets_repo.require_dataset(session, dataset_id, tenant_id=who.tenant_id)
    return dataset_tokens(session, settings, who.tenant_id, dataset, model, max_length)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(
    dataset_id: str, session: SessionDep, settings: SettingsDep, who: JobsWrite
) -> Response:
    remove_dataset(session, settings, who, dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def remove_dataset(session: Session, settings: Settings, who: Principal, dataset_id: str) -> None:
    """Delete the row (committed), then the file."""
    dataset = datasets_repo.delete_dataset(session, dataset_id, tenant_id=who.tenant_id)
    who.audit(session, "dataset.delete", "dataset", dataset_id)
    session.commit()
    _remove_dataset_dir(settings, str(PurePosixPath(dataset.path).parent))
    logger.info("dataset %s deleted", dataset_id)
