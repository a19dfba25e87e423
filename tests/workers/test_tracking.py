"""Experiment tracking of fine-tunes: TensorBoard event files and MLflow runs (a real
`mlflow server`) from the runner (real Trainer on the tiny GPT-2, in-memory TrainingIO),
and which trackers a job gets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from core.enums import DatasetSchema, Tracker
from core.errors import JobStopped
from core.settings import Settings
from core.specs import FineTuneSpec
from tests.support.memory_io import MemoryTrainingIO, StopAtStep
from tests.support.mlflow_server import mlflow_server
from tests.support.services import free_port
from workers.context import RunContext
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
    io: MemoryTrainingIO, tmp_path: Path
) -> None:
    spec = {
        "base_model": "tiny-gpt2",
        "task": "causal_lm",
        "training_dataset": io.add_dataset(DatasetSchema.TEXT, [{"text": TEXT}] * 16),
        "hyperparameters": {"batch_size": 4, "max_steps": 6, "eval_steps": 3},
        "tracking": ["tensorboard"],
    }
    ctx = RunContext(job_id=io.job_id, attempt=1, device="cpu")

    result = FineTuneRunner(Settings(data_dir=tmp_path), lambda _: io).run(spec, ctx)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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


def test_untracked_fine_tunes_write_no_event_files(io: MemoryTrainingIO, tmp_path: Path) -> None:
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


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def _mlflow_spec(io: MemoryTrainingIO) -> dict[str, Any]:
    return {
        "base_model": "tiny-gpt2",
        "task": "causal_lm",
        "training_dataset": io.add_dataset(DatasetSchema.TEXT, [{"text": TEXT}] * 16),
        "hyperparameters": {"batch_size": 4, "max_steps": 6, "eval_steps": 3},
        "tracking": ["mlflow"],
    }


def test_each_attempt_is_an_mlflow_run_ended_with_its_outcome(
    io: MemoryTrainingIO, tmp_path: Path, mlflow_url: str
) -> None:
    spec = _mlflow_spec(io)
    settings = Settings(
        data_dir=tmp_path, mlflow_tracking_uri=SecretStr(mlflow_url), mlflow_experiment="t"
    )
    runner = FineTuneRunner(settings, lambda _: io)
    with pytest.raises(JobStopped):  # attempt 1: cancelled at step 2, with a checkpoint
        runner.run(spec, StopAtStep(io.job_id, 2))
    second = RunContext(job_id=io.job_id, attempt=2, device="cpu")

    result = runner.run(spec, second)  # attempt 2 resumes from it

    assert result.result is not None and result.result["resumed_from_step"] == 2
    named = result.result["tracking"]["mlflow"]
    assert named["run_name"] == f"{io.job_id}-attempt-2" and named["experiment"] == "t"
    assert mlflow_url not in json.dumps(result.result)  # the URI may carry credentials
    from mlflow.tracking import MlflowClient  # imported here: seconds at collection otherwise

    client = MlflowClient(tracking_uri=mlflow_url)
    runs = client.search_runs(
        [named["experiment_id"]], filter_string=f"tags.`modelyard.job_id` = '{io.job_id}'"
    )
    by_attempt = {r.data.tags["modelyard.attempt"]: r for r in runs}
    assert {a: r.info.status for a, r in by_attempt.items()} == {"1": "KILLED", "2": "FINISHED"}
    assert by_attempt["2"].info.run_id == named["run_id"]
    losses = client.get_metric_history(named["run_id"], "loss")
    assert [m.step for m in losses] == [3, 4, 5, 6]  # the resumed steps only
    recorded = {p.step: p.value for p in io.metrics if p.name == "train_loss" and p.step > 2}
    assert all(abs(m.value - recorded[m.step]) < 1e-4 for m in losses)
    evaluations = client.get_metric_history(named["run_id"], "eval_loss")
    assert [m.step for m in evaluations] == [3, 6, 6]  # the final evaluation too
    assert by_attempt["2"].data.params["max_steps"] == "6"  # the Trainer's arguments
    assert [m for m, _ in io.events].count("MLflow run started") == 2


def test_an_unreachable_tracking_server_costs_the_run_not_the_training(
    io: MemoryTrainingIO, tmp_path: Path
) -> None:
    spec = _mlflow_spec(io)
    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(data_dir=tmp_path, mlflow_tracking_uri=SecretStr(dead))

    result = FineTuneRunner(settings, lambda _: io).run(spec, RunContext(io.job_id, 1, "cpu"))

    assert result.result is not None and result.result["train"]["global_step"] == 6
    assert result.result["tracking"] == {}
    assert "MLflow tracking server unreachable: no run for this attempt" in io.messages()


def test_the_mlflow_tracker_needs_a_server_in_the_settings() -> None:
    with pytest.raises(ValueError, match="MODELYARD_MLFLOW_TRACKING_URI"):
        Settings(tracking=[Tracker.MLFLOW])


def test_an_offline_wandb_run_holds_the_attempts_metrics_and_arguments(
    io: MemoryTrainingIO, tmp_path: Path
) -> None:
    spec = _mlflow_spec(io)
    spec["tracking"] = ["wandb"]
    settings = Settings(data_dir=tmp_path, wandb_mode="offline", wandb_project="p")

    result = FineTuneRunner(settings, lambda _: io).run(spec, RunContext(io.job_id, 1, "cpu"))

    from tests.support import wandb_runs

    assert result.result is not None
    named = result.result["tracking"]["wandb"]
    assert named["run_name"] == f"{io.job_id}-attempt-1" and named["mode"] == "offline"
    run_dir = tmp_path / named["dir"]
    assert run_dir.is_relative_to(io.work_dir / "wandb")  # inside the attempt's directory
    assert run_dir.name.startswith("offline-run-") and run_dir.name.endswith(named["run_id"])
    run_file = run_dir / f"run-{named['run_id']}.wandb"
    logged = wandb_runs.history(run_file)
    losses = {h["train/global_step"]: h["train/loss"] for h in logged if "train/loss" in h}
    recorded = {p.step: p.value for p in io.metrics if p.name == "train_loss"}
    assert losses.keys() == recorded.keys() == set(range(1, 7))  # what our database got
    assert all(abs(losses[s] - recorded[s]) < 1e-4 for s in recorded)
    assert [h["train/global_step"] for h in logged if "eval/loss" in h] == [3, 6, 6]
    config = wandb_runs.config(run_file)
    assert config["modelyard"]["modelyard.job_id"] == io.job_id  # our tags
    assert config["max_steps"] == 6 and config["learning_rate"] == 5e-5  # Trainer's arguments
