"""Checkpoints that rotation (save_total_limit) prunes go from the shared store too, so a
resume on another host never fetches them; a store that fails to remove one is logged
and the attempt goes on. Real DbTrainingIO, database, Trainer callback and S3 (moto)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from transformers import TrainerControl, TrainerState, TrainingArguments

from core.enums import JobKind
from core.settings import Settings
from core.storage import artifact_store
from db.jobs import claim
from db.models import Checkpoint
from db.session import migrate, session_scope
from tests.support.jobs import insert_job
from tests.support.s3 import S3Store, moto_s3_store
from workers.context import RunContext
from workers.training.callbacks import CheckpointCallback
from workers.training.db_io import DbTrainingIO

BACKENDS = ["sqlite"]  # about the store, not the database; fenced writes run on both elsewhere


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Store]:
    with moto_s3_store() as store:
        yield store


def _settings(database_url: str, data_dir: Path, store: S3Store) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        storage_url=store.url,
        storage_options=store.options,
    )


def _claimed_io(settings: Settings) -> tuple[DbTrainingIO, RunContext]:
    """The IO of attempt 1 of a fine-tune this test's worker holds, and its context."""
    job_id = insert_job(settings.database_url, kind=JobKind.FINETUNE)
    with session_scope(settings.database_url) as s:
        row = claim(s, job_id, "host-b:1", timedelta(seconds=60))
        assert row is not None
        tenant_id = row.tenant_id
    ctx = RunContext(job_id=job_id, attempt=1, device="cpu", tenant_id=tenant_id)
    return DbTrainingIO(settings, ctx), ctx


def _write_checkpoint(run_dir: Path, step: int) -> Path:
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(4096))
    (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    os.utime(path, (1_000_000 + step, 1_000_000 + step))  # rotation orders by mtime
    return path


def _shared_checkpoints(store: S3Store, io: DbTrainingIO, settings: Settings) -> list[str]:
    run_dir = (io.work_dir / "checkpoints").relative_to(settings.data_dir.resolve())
    prefix = store.key(run_dir.as_posix())
    names = {
        key.removeprefix(prefix + "/").split("/")[0] for key in store.filesystem().find(prefix)
    }
    return sorted(names)


def test_pruned_checkpoints_are_removed_from_the_store_too(
    s3: S3Store, database_url: str, tmp_path: Path
) -> None:
    migrate(database_url)
    settings = _settings(database_url, tmp_path / "host-b", s3)
    io, ctx = _claimed_io(settings)
    run_dir = io.work_dir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(run_dir), save_total_limit=2, report_to=[], use_cpu=True
    )
    callback = CheckpointCallback(io)
    for step in (2, 4, 6, 8):
        _write_checkpoint(run_dir, step)
        callback.on_save(args, TrainerState(global_step=step), TrainerControl())

    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert _shared_checkpoints(s3, io, settings) == ["checkpoint-6", "checkpoint-8"]
    with session_scope(database_url, readonly=True) as s:
        steps = s.scalars(select(Checkpoint.step).where(Checkpoint.job_id == ctx.job_id))
        assert sorted(steps) == [2, 4, 6, 8]  # rows stay; their files are gone everywhere
    # a resume on a host with an empty data dir finds (and fetches) only what was kept
    elsewhere = DbTrainingIO(_settings(database_url, tmp_path / "host-c", s3), ctx)
    latest = elsewhere.latest_checkpoint()
    assert latest is not None and latest.step == 8
    fetched = tmp_path / "host-c" / run_dir.relative_to(settings.data_dir.resolve())
    assert sorted(p.name for p in fetched.iterdir()) == ["checkpoint-6", "checkpoint-8"]


def test_a_store_that_fails_to_remove_is_logged_and_training_goes_on(
    database_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would take ~10 s
    migrate(database_url)
    with moto_s3_store() as down:
        settings = _settings(database_url, tmp_path / "host-b", down)
        io, ctx = _claimed_io(settings)
        old = _write_checkpoint(io.work_dir / "checkpoints", 2)
        artifact_store(settings).publish(old)
        assert down.filesystem().find(down.key(""))  # it is in the store
        shutil.rmtree(old)  # as rotation does, before the IO is told
    # the server is gone now
    with caplog.at_level(logging.WARNING, logger="workers.training.db_io"):
        io.remove_pruned([old])
    (record,) = [r for r in caplog.records if "pruned checkpoint" in r.getMessage()]
    assert ctx.job_id in record.getMessage()
    assert "checkpoint-2" in record.getMessage()
    assert down.options["secret"] not in caplog.text
    assert not ctx.lease_lost and not ctx.stop_event.is_set()
