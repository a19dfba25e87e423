"""The best evaluated checkpoint becomes the model: the runner in-process on a tiny
classifier whose validation labels are the training labels flipped, so that the better it
learns the worse it scores and the last checkpoint is not the best (its F1 falls from 0.33
to 0 within 24 steps at a learning rate of 5e-3; at 1e-2 its loss is lowest at step 6 of
12, then rises)."""

from __future__ import annotations

import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerState, TrainingArguments

from core.enums import DatasetSchema, FineTuneTask
from core.errors import JobStopped
from core.settings import Settings
from core.specs import EVAL_METRICS
from tests.support.memory_io import MemoryTrainingIO, StopAtStep
from workers.context import RunContext
from workers.model_refs import ResolvedModel
from workers.runners import RunResult
from workers.training.callbacks import is_new_best
from workers.training.checkpoints import rotate_checkpoints_of_attempt
from workers.training.reports import compute_metrics_for
from workers.training.runner import FineTuneRunner

CLASSIFIER = "tiny-bert-cls"
WORDS = {
    "neg": ["late", "damaged", "never", "weak", "refund"],
    "pos": ["quick", "friendly", "clean", "quiet", "good"],
}
FLIPPED = {"neg": "pos", "pos": "neg"}
HP = {"batch_size": 8, "learning_rate": 1e-2, "max_steps": 12, "eval_steps": 3}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_encoder import build_tiny_bert_classifier

    return build_tiny_bert_classifier(
        tmp_path_factory.mktemp("encoders") / CLASSIFIER, ["neg", "pos"]
    )


@pytest.fixture
def io(tmp_path: Path, classifier: Path) -> MemoryTrainingIO:
    memory = MemoryTrainingIO(work_dir=tmp_path / "attempts" / "1")
    memory.work_dir.mkdir(parents=True)
    memory.models[CLASSIFIER] = ResolvedModel(ref=str(classifier))
    return memory


def rows(n: int, seed: int, flip: bool = False) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = ["neg", "pos"][i % 2]
        text = " ".join(rng.choice(WORDS[label]) for _ in range(4))
        out.append({"text": text, "label": FLIPPED[label] if flip else label})
    return out


def run(io: MemoryTrainingIO, ctx: RunContext | None = None, **spec: Any) -> RunResult:
    if "training_dataset" not in spec:
        spec["training_dataset"] = io.add_dataset(DatasetSchema.CLASSIFICATION, rows(48, 1))
        spec["validation_dataset"] = io.add_dataset(
            DatasetSchema.CLASSIFICATION, rows(16, 2, flip=True)
        )
    full = {
        "base_model": CLASSIFIER,
        "task": "sequence_classification",
        "metric_for_best_model": "loss",
        "hyperparameters": HP,
        **spec,
    }
    ctx = ctx or RunContext(job_id=io.job_id, attempt=1, device="cpu")
    return FineTuneRunner(Settings(data_dir=io.work_dir), lambda _: io).run(full, ctx)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_the_model_is_the_best_checkpoint_not_the_last(io: MemoryTrainingIO) -> None:
    hp = {"batch_size": 8, "learning_rate": 5e-3, "max_steps": 24, "eval_steps": 4}
    result = run(io, metric_for_best_model=None, hyperparameters=hp)
    assert result.result is not None and result.trained_model is not None
    scores = dict(io.metric_values("eval_f1_macro"))
    assert sorted(scores) == [4, 8, 12, 16, 20, 24]
    best = result.result["best_checkpoint"]
    assert best["metric"] == "eval_f1_macro"  # the classification default
    assert best["score"] == max(scores.values()) > scores[24]
    # an evaluation that only ties the best does not replace it
    assert best["step"] == min(step for step, score in scores.items() if score == best["score"])
    # the final report evaluates the kept model again: the best checkpoint's score
    assert result.result["eval"]["macro avg"]["f1-score"] == pytest.approx(best["score"])

    checkpoints = io.work_dir / "checkpoints"
    kept = checkpoints / f"checkpoint-{best['step']}"
    # six checkpoints, three kept: rotation removed three, never the best, however old
    assert len(io.pruned) == 3 and kept not in io.pruned and kept.is_dir()
    model = weights(result.trained_model.path)
    assert same_weights(model, weights(kept))
    assert not same_weights(model, weights(checkpoints / "checkpoint-24"))
    assert f"the model is the best checkpoint, step {best['step']}" in io.messages()


@pytest.mark.parametrize("earlier_best", ["on_another_host", "gone"])
def test_a_resumed_attempt_keeps_the_best_of_an_earlier_attempt(
    io: MemoryTrainingIO, tmp_path: Path, earlier_best: str
) -> None:
    """Attempt 1 is cancelled at step 7 after its best evaluation; attempt 2 resumes in its
    own directory. Its best checkpoint lies in attempt 1's directory, found at another path
    than attempt 1 wrote (fetched from the store to another host's data dir), or is gone."""
    data = {
        "training_dataset": io.add_dataset(DatasetSchema.CLASSIFICATION, rows(48, 1)),
        "validation_dataset": io.add_dataset(DatasetSchema.CLASSIFICATION, rows(16, 2, flip=True)),
    }
    with pytest.raises(JobStopped):
        run(io, StopAtStep(io.job_id, step=7), **data)
    first = dict(io.metric_values("eval_loss"))
    best_step = min(first, key=lambda step: first[step])
    assert [c.step for c in io.recorded_checkpoints] == [3, 6, 7]

    elsewhere = tmp_path / "host-c" / "attempts" / "1"
    shutil.move(io.work_dir, elsewhere)
    io.checkpoints[io.job_id] = [
        replace(c, path=elsewhere / "checkpoints" / c.path.name) for c in io.recorded_checkpoints
    ]
    if earlier_best == "gone":
        shutil.rmtree(elsewhere / "checkpoints" / f"checkpoint-{best_step}")
    io.work_dir = tmp_path / "attempts" / "2"
    io.work_dir.mkdir()

    result = run(io, RunContext(job_id=io.job_id, attempt=2, device="cpu"), **data)
    assert result.result is not None and result.trained_model is not None
    assert result.result["resumed_from_step"] == 7
    best = result.result["best_checkpoint"]
    model = weights(result.trained_model.path)
    if earlier_best == "on_another_host":
        assert best == {"step": best_step, "metric": "eval_loss", "score": first[best_step]}
        assert same_weights(model, weights(elsewhere / "checkpoints" / f"checkpoint-{best_step}"))
        assert f"the best checkpoint so far is step {best_step}" in io.messages()
    else:
        assert any(
            m.startswith(f"the best checkpoint so far, step {best_step}, is gone")
            for m in io.messages()
        )
        assert best["step"] in (9, 12)  # chosen again among attempt 2's evaluations
        later = io.work_dir / "checkpoints" / f"checkpoint-{best['step']}"
        assert same_weights(model, weights(later))


def test_an_evaluation_between_checkpoints_is_saved_when_it_is_the_best(
    io: MemoryTrainingIO,
) -> None:
    result = run(io, hyperparameters={**HP, "checkpoint_steps": 4})
    assert result.result is not None and result.trained_model is not None
    scores = io.metric_values("eval_loss")
    new_bests = [
        step for i, (step, score) in enumerate(scores) if all(score < s for _, s in scores[:i])
    ]
    assert [step for step, _ in scores] == [3, 6, 9, 12] and new_bests[0] == 3
    assert [c.step for c in io.recorded_checkpoints] == sorted({4, 8, 12, *new_bests})
    best = result.result["best_checkpoint"]
    assert best["step"] == new_bests[-1]
    kept = io.work_dir / "checkpoints" / f"checkpoint-{best['step']}"
    assert same_weights(weights(result.trained_model.path), weights(kept))


def evaluation_args(metric: str, greater_is_better: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir="/nonexistent",
        metric_for_best_model=metric,
        greater_is_better=greater_is_better,
        report_to="none",
        use_cpu=True,
    )


def test_a_new_best_is_strictly_better_and_never_nan() -> None:
    f1 = evaluation_args("eval_f1", greater_is_better=True)
    loss = evaluation_args("loss", greater_is_better=False)  # Trainer's names take both forms
    assert is_new_best(f1, TrainerState(), {"eval_f1": 0.0})
    assert not is_new_best(f1, TrainerState(), {"eval_f1": float("nan")})
    assert not is_new_best(f1, TrainerState(), {"eval_loss": 0.1})  # not measured
    assert is_new_best(f1, TrainerState(best_metric=0.5), {"eval_f1": 0.6})
    assert not is_new_best(f1, TrainerState(best_metric=0.5), {"eval_f1": 0.5})
    assert is_new_best(loss, TrainerState(best_metric=0.5), {"eval_loss": 0.4})
    assert not is_new_best(loss, TrainerState(best_metric=0.5), {"eval_loss": 0.6})


def test_rotation_keeps_the_best_checkpoint_however_it_is_spelled(tmp_path: Path) -> None:
    run_dir = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "link").symlink_to(run_dir)
    best = tmp_path / "link" / "checkpoint-1"  # the oldest, named through a symlink
    removed = rotate_checkpoints_of_attempt(run_dir, 3, str(best))
    assert [p.name for p in removed] == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint-1",
        "checkpoint-4",
        "checkpoint-5",
    ]
    # an earlier attempt's best is not this directory's: plain rotation
    elsewhere = str(tmp_path / "attempts" / "1" / "checkpoints" / "checkpoint-1")
    assert [p.name for p in rotate_checkpoints_of_attempt(run_dir, 1, elsewhere)] == [
        "checkpoint-1",
        "checkpoint-4",
    ]


@pytest.mark.parametrize(
    ("task", "labels"),
    [
        (FineTuneTask.SEQUENCE_CLASSIFICATION, ["neg", "pos"]),
        (FineTuneTask.TOKEN_CLASSIFICATION, ["B-PER", "O"]),
    ],
)
def test_specs_offer_the_metrics_evaluations_report(task: FineTuneTask, labels: list[str]) -> None:
    compute = compute_metrics_for(task, labels)
    assert compute is not None
    ids = np.array([[0, 1]]) if task is FineTuneTask.TOKEN_CLASSIFICATION else np.array([0, 1])
    prediction = type("Prediction", (), {"predictions": ids, "label_ids": ids})()
    reported = {"eval_loss", *(f"eval_{name}" for name in compute(prediction))}
    assert reported == set(EVAL_METRICS[task])
