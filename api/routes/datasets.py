"""Dataset uploads: validated in full before anything is stored, then file first, row second."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status

from api.cursors import decode_cursor, encode_cursor, split_page
from api.deps import ReadSessionDep, SessionDep, SettingsDep
from api.schemas import DatasetList, DatasetOut
from core.datasets import display_filename, parse_dataset
from core.settings import Settings
from db import datasets as datasets_repo
from db.models import new_dataset_id

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

DATASETS_DIR = "datasets"


def _datasets_root(settings: Settings) -> Path:
    return settings.data_dir.resolve() / DATASETS_DIR


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


def _remove_dataset_dir(settings: Settings, dataset_id: str) -> None:
    directory = _datasets_root(settings) / dataset_id
    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("dataset %s: could not remove %s: %s", dataset_id, directory, exc)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut)
def upload_dataset(
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JSON Lines, CSV (text,label) or CoNLL/BIO file")],
    name: Annotated[
        str | None, Form(max_length=255, description="Filename to record instead of the upload's")
    ] = None,
) -> DatasetOut:
    raw = file.file.read()
    filename = display_filename(name or file.filename)
    parsed = parse_dataset(raw, filename)
    dataset_id = new_dataset_id()
    stored_name = f"data.{parsed.format.value}"
    directory = _datasets_root(settings) / dataset_id
    directory.mkdir(parents=True)
    try:
        _write_file(directory / stored_name, raw)
        dataset = datasets_repo.create_dataset(
            session,
            dataset_id=dataset_id,
            filename=filename or stored_name,
            format=parsed.format.value,
            schema=parsed.schema.value,
            rows=len(parsed.rows),
            labels=parsed.labels,
            sha256=hashlib.sha256(raw).hexdigest(),
            size_bytes=len(raw),
            path=f"{DATASETS_DIR}/{dataset_id}/{stored_name}",
            report=parsed.report,
        )
        session.commit()
    except BaseException:
        session.rollback()
        _remove_dataset_dir(settings, dataset_id)
        raise
    logger.info(
        "dataset %s stored: %s, %s, %d rows, %d warnings",
        dataset_id,
        parsed.format.value,
        parsed.schema.value,
        len(parsed.rows),
        parsed.report["warnings_total"],
    )
    return DatasetOut.of(dataset)


@router.get("", response_model=DatasetList)
def list_datasets(
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> DatasetList:
    before = decode_cursor(cursor) if cursor else None
    rows, has_more = split_page(
        datasets_repo.list_datasets(session, limit=limit + 1, before=before), limit
    )
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more else None
    return DatasetList(
        data=[DatasetOut.of(d) for d in rows], has_more=has_more, next_cursor=next_cursor
    )


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: ReadSessionDep) -> DatasetOut:
    return DatasetOut.of(datasets_repo.require_dataset(session, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep) -> Response:
    dataset = datasets_repo.delete_dataset(session, dataset_id)
    session.commit()
    _remove_dataset_dir(settings, dataset.id)
    logger.info("dataset %s deleted", dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
