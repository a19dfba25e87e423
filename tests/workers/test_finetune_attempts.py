"""Two attempts of one fine-tune on the real Trainer and a real database: the first is
taken over mid-training and stops without a save; the second resumes from the first's
newest recorded checkpoint, and neither touches the other's files."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from core.enums import DatasetSchema, JobKind
from core.errors import JobStopped
from core.settings import Settings
from db.fencing import current_attempt
from db.jobs import claim
from db.models import Checkpoint, Job, Metric
from db.session import migrate, session_scope
from tests.support.jobs import insert_job
from workers.context import RunContext
from workers.model_refs import ResolvedModel
from workers.training.db_io import DbTrainingIO
from workers.training.io import DatasetRows
from workers.training.layout import STEP_MARKER
from workers.training.runner import FineTuneRunner

DATASET = "ds_" + "7" * 32
MODEL = "tiny-gpt2"
SPEC: dict[str, Any] = {
    "base_model": MODEL,
    "task": "causal_lm",
    "training_dataset": DATASET,
    "hyperparameters": {
        "batch_size": 4,
        "learning_rate": 5e-3,
        "max_steps": 30,
        "eval_steps": 10,
        "checkpoint_steps": 5,
    },
}


class TrainingIOOverDatabase(DbTrainingIO):
    """The real DbTrainingIO (fenced writes, checkpoint rows, resume) with the dataset and
    the base model handed in: they are reads, not what these tests are about."""

    def __init__(self, settings: Settings, ctx: RunContext, model: Path) -> None:
        super().__init__(settings, ctx)
        self._model = model

    def dataset(self, dataset_id: str) -> DatasetRows:
        text = "the cat sat on the mat and the dog sat on the log. " * 3
        return DatasetRows(id=dataset_id, schema=DatasetSchema.TEXT, rows=[{"text": text}] * 40)

    def resolve_model(self, ref: str) -> ResolvedModel:
        return ResolvedModel(ref=str(self._model))


class TakenOverAtStep(RunContext):
    """Attempt 1, whose job another worker takes over (attempt 2) once it reaches `step`."""

    def __init__(self, settings: Settings, job_id: str, tenant_id: str, step: int) -> None:
        super().__init__(job_id=job_id, attempt=1, device="cpu", tenant_id=tenant_id)
        self._settings = settings
        self._step = step
        self.taken_over = False

    def report_progress(self, fraction: float, **detail: Any) -> None:
        super().report_progress(fraction, **detail)
        if detail.get("step", 0) >= self._step and not self.taken_over:
            with session_scope(self._settings.database_url) as s:
                s.execute(
                    update(Job)
                    .where(*current_attempt(self.job_id, self.attempt))
                    .values(attempts=self.attempt + 1, lease_owner="host-b:2")
                )
            self.taken_over = True


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    migrate(database_url)
    return Settings(data_dir=tmp_path_factory.mktemp("data"), database_url=database_url)


def checkpoint_dirs(run_dir: Path) -> dict[str, float]:
    """Each entry of an attempt's run directory, with the mtime of its weights."""
    found = {}
    for entry in sorted(run_dir.iterdir()):
        weights = entry / "model.safetensors"
        found[entry.name] = weights.stat().st_mtime_ns if weights.exists() else 0
    return found


def test_taken_over_attempt_stops_unsaved_and_the_next_resumes_from_its_record(
    settings: Settings, tiny_model_dir: Path
) -> None:
    job_id = insert_job(settings.database_url, kind=JobKind.FINETUNE)
    with session_scope(settings.database_url) as s:
        row = claim(s, job_id, "host-a:1", timedelta(seconds=60))
    assert row is not None and row.attempts == 1
    runner = FineTuneRunner(
        settings, lambda ctx: TrainingIOOverDatabase(settings, ctx, tiny_model_dir)
    )

    stale = TakenOverAtStep(settings, job_id, row.tenant_id, step=12)
    with pytest.raises(JobStopped, match="lease lost"):
        runner.run(SPEC, stale)
    assert stale.taken_over and stale.lease_lost
    first = DbTrainingIO(settings, stale).work_dir
    # checkpoints 5 and 10 were recorded; the attempt stopped at its first refused write
    # (by step 15 at the latest), saved nothing more and left no staging behind
    assert list(checkpoint_dirs(first / "checkpoints")) == ["checkpoint-10", "checkpoint-5"]
    assert not (first / "model").exists()
    with session_scope(settings.database_url) as s:
        rows = s.execute(
            select(Checkpoint.step, Checkpoint.path).where(Checkpoint.job_id == job_id)
        )
        recorded = dict(rows.all())
        last_metric = s.scalar(
            select(Metric.step).where(Metric.job_id == job_id).order_by(Metric.step.desc())
        )
    assert sorted(recorded) == [5, 10]
    assert last_metric is not None and last_metric <= 12
    assert all("/attempts/1/checkpoints/" in path for path in recorded.values())

    # the stale attempt wakes up mid-save while the live one runs: its staging is its own
    stale_staging = first / "checkpoints" / ".staging" / "checkpoint-15"
    stale_staging.mkdir(parents=True)
    (stale_staging / "model.safetensors").write_bytes(b"half written")
    before = checkpoint_dirs(first / "checkpoints")

    live = RunContext(job_id=job_id, attempt=2, device="cpu", tenant_id=row.tenant_id)
    result = runner.run(SPEC, live)
    assert not live.lease_lost
    assert result.result is not None and result.result["resumed_from_step"] == 10
    reached = int((first / STEP_MARKER).read_text())
    assert result.result["steps_redone"] == reached - 10 > 0
    second = DbTrainingIO(settings, live).work_dir
    assert list(checkpoint_dirs(second / "checkpoints")) == [
        "checkpoint-20",
        "checkpoint-25",
        "checkpoint-30",
    ]  # rotation kept its own newest three
    assert checkpoint_dirs(first / "checkpoints") == before  # and touched nothing of attempt 1
    assert (stale_staging / "model.safetensors").read_bytes() == b"half written"
    assert result.trained_model is not None
    assert result.trained_model.path == second / "model"
    assert (second / "model" / "model.safetensors").is_file()
    with session_scope(settings.database_url) as s:
        paths = dict(
            s.execute(
                select(Checkpoint.step, Checkpoint.path).where(Checkpoint.job_id == job_id)
            ).all()
        )
    assert sorted(paths) == [5, 10, 15, 20, 25, 30]
    assert all("/attempts/2/" in paths[step] for step in (15, 20, 25, 30))
