"""Experiment tracking of fine-tunes: TensorBoard event files from the runner (real
Trainer on the tiny GPT-2, in-memory TrainingIO), and which trackers a job gets."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.enums import DatasetSchema, Tracker
from core.settings import Settings
from core.specs import FineTuneSpec
from tests.support.memory_io import MemoryTrainingIO
from workers.context import RunContext
from workers.model_refs import ResolvedModel
from workers.training.runner import FineTuneRunner
from workers.training.tracking import trackers_for

TEXT = "the cat sat on the mat and the dog sat on the log. " * 3


def _spec(**fields: object) -> FineTuneSpec:
    return FineTuneSpec.model_validate(
        {"base_model": "m", "task": "causal_lm", "training_dataset": "ds_" + "0" * 32, **fields}
    )


def test_a_job_names_its_trackers_or_takes_the_deployments() -> None:
    on = Settings(tracking=[Tracker.TENSORBOARD])
    assert trackers_for(_spec(), Settings()) == []  # off by default
    assert trackers_for(_spec(), on) == [Tracker.TENSORBOARD]
    assert trackers_for(_spec(tracking=[]), on) == []  # a job may turn it off
    assert trackers_for(_spec(tracking=["tensorboard"]), Settings()) == [Tracker.TENSORBOARD]


def test_a_tracked_fine_tune_writes_its_metrics_as_tensorboard_scalars(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    io = MemoryTrainingIO(work_dir=tmp_path / "work")
    io.work_dir.mkdir()
    io.models["tiny-gpt2"] = ResolvedModel(ref=str(tiny_model_dir))
    spec = {
        "base_model": "tiny-gpt2",
        "task": "causal_lm",
        "training_dataset": io.add_dataset(DatasetSchema.TEXT, [{"text": TEXT}] * 16),
        "hyperparameters": {"batch_size": 4, "max_steps": 6, "eval_steps": 3},
        "tracking": ["tensorboard"],
    }
    ctx = RunContext(job_id=io.job_id, attempt=1, device="cpu")

    result = FineTuneRunner(Settings(data_dir=tmp_path), lambda _: io).run(spec, ctx)

    assert result.result is not None
    log_dir = io.work_dir / "tensorboard"
    assert result.result["tracking"] == {"tensorboard": {"log_dir": "work/tensorboard"}}
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= set(scalars), scalars
    # every evaluation, the final one (step 6 again) included
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 6, 6]
    train_losses = {e.step: e.value for e in events.Scalars("train/loss")}
    recorded = {p.step: p.value for p in io.metrics if p.name == "train_loss"}
    assert train_losses.keys() == recorded.keys()  # the same points our database got
    assert all(abs(train_losses[s] - recorded[s]) < 1e-4 for s in recorded)


def test_untracked_fine_tunes_write_no_event_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    io = MemoryTrainingIO(work_dir=tmp_path / "work")
    io.work_dir.mkdir()
    io.models["tiny-gpt2"] = ResolvedModel(ref=str(tiny_model_dir))
    spec = {
        "base_model": "tiny-gpt2",
        "task": "causal_lm",
        "training_dataset": io.add_dataset(DatasetSchema.TEXT, [{"text": TEXT}] * 8),
        "hyperparameters": {"batch_size": 4, "max_steps": 2},
    }
    ctx = RunContext(job_id=io.job_id, attempt=1, device="cpu")

    result = FineTuneRunner(Settings(data_dir=tmp_path), lambda _: io).run(spec, ctx)

    assert result.result is not None and result.result["tracking"] == {}
    assert not (io.work_dir / "tensorboard").exists()
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
