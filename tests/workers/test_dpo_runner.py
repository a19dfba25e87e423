"""Preference tuning (objective dpo) in-process on the tiny GPT-2: TRL's DPOTrainer with the
runner's checkpoints, metrics, stop and resume, full and with adapters (new and continued),
and the pair encoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from core.enums import DatasetSchema
from core.errors import JobStopped, PermanentJobError
from core.settings import Settings
from tests.support.memory_io import MemoryTrainingIO, StopAtStep, job_id
from tests.support.tiny_model import CHAT_TEMPLATE
from workers.context import RunContext
from workers.model_refs import ResolvedModel
from workers.runners import RunResult
from workers.training.preference import encode_preference
from workers.training.runner import FineTuneRunner

GPT2 = "tiny-gpt2"
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
PAIRS = [
    {"prompt": "Fresh bread", "chosen": " every morning at the bakery", "rejected": " report"},
    {"prompt": "Our support team", "chosen": " answers every question", "rejected": " mug"},
]


def run(
    io: MemoryTrainingIO,
    ctx: RunContext | None = None,
    hyperparameters: dict[str, Any] | None = None,
    **spec: Any,
) -> RunResult:
    hp = {"batch_size": 4, "learning_rate": 5e-3, "max_steps": 6, **(hyperparameters or {})}
    merged = {
        "base_model": GPT2,
        "task": "causal_lm",
        "objective": "dpo",
        "training_dataset": io.add_dataset(DatasetSchema.PREFERENCE, PAIRS * 4),
        "hyperparameters": hp,
        **spec,
    }
    ctx = ctx or RunContext(job_id=io.job_id, attempt=1, device="cpu")
    return FineTuneRunner(Settings(data_dir=io.work_dir), lambda _: io).run(merged, ctx)


def test_full_dpo_prefers_the_chosen_answers_and_reports_trl_rewards(
    io: MemoryTrainingIO,
) -> None:
    result = run(io, hyperparameters={"checkpoint_steps": 3, "eval_steps": 3})

    for name in REWARDS:  # TRL's names, one point per step
        assert [step for step, _ in io.metric_values(name)] == list(range(1, 7)), name
    margins = io.metric_values("rewards/margins")
    assert margins[0][1] == 0.0  # the policy starts as its reference
    assert margins[-1][1] > 0.5
    assert io.metric_values("rewards/accuracies")[-1][1] == 1.0
    assert [c.step for c in io.recorded_checkpoints] == [3, 6]
    checkpoints = io.work_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert (checkpoints / "checkpoint-6" / "model.safetensors").is_file()

    assert result.result is not None and result.result["objective"] == "dpo"
    assert result.result["trained_tokens"] > 0, result.result
    report = result.result["eval"]
    assert report["rewards/accuracies"] == 1.0 and report["rewards/margins"] > 0.5
    assert "num_tokens" not in report and "perplexity" not in report
    model = result.trained_model
    assert model is not None and not model.adapter
    assert "model.safetensors" in {p.name for p in model.path.iterdir()}
    assert model.metrics["rewards/margins"] == report["rewards/margins"]


def test_lora_dpo_on_a_registered_adapter_resumes_from_its_checkpoint(
    io: MemoryTrainingIO, tiny_model_dir: Path
) -> None:
    """A supervised LoRA job's registered model is the base of a DPO job, which is stopped
    after its checkpoint and claimed again: it resumes there and saves one adapter."""
    text = io.add_dataset(DatasetSchema.TEXT, [{"text": "Fresh bread every morning. "}] * 8)
    supervised = run(
        io,
        hyperparameters={"max_steps": 2},
        objective="supervised",
        method="lora",
        training_dataset=text,
    )
    assert supervised.trained_model is not None
    io.models["ft:tiny-gpt2:sft:1"] = ResolvedModel(
        ref=str(supervised.trained_model.path), adapter_of=str(tiny_model_dir)
    )
    io.job_id = job_id()
    io.work_dir = io.work_dir.parent / io.job_id
    io.work_dir.mkdir()
    hp = {"max_steps": 5, "learning_rate": 2e-2, "checkpoint_steps": 2}
    spec: dict[str, Any] = {"base_model": "ft:tiny-gpt2:sft:1", "method": "lora"}
    with pytest.raises(JobStopped):
        run(io, StopAtStep(io.job_id, step=2), hyperparameters=hp, **spec)
    assert [c.step for c in io.recorded_checkpoints] == [2]

    result = run(io, hyperparameters=hp, **spec)
    assert result.result is not None and result.result["resumed_from_step"] == 2
    assert "resuming from step 2" in io.messages()
    started = [d for m, d in io.events if m == "training started"][-1]
    assert started is not None and started["objective"] == "dpo"
    assert started["weights"].startswith("adapter ")
    assert io.metric_values("rewards/margins")[-1][1] > 0
    model = result.trained_model
    assert model is not None and model.adapter
    saved = {p.name for p in model.path.iterdir()}
    assert "adapter_model.safetensors" in saved and "ref" not in saved  # TRL's frozen copy


# peft warns when it loads any saved AdaLoRA adapter (a supervised one too): the rank_pattern
# keys it saved do not match the modules it targets on load.
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys:RuntimeWarning")
def test_a_new_adalora_adapter_is_trained_against_the_model_without_it(
    io: MemoryTrainingIO, tiny_model_dir: Path
) -> None:
    """A new adapter is added by TRL: the reference is the model with it disabled, and no
    frozen copy of it is saved. An AdaLoRA adapter cannot be trained further with DPO."""
    result = run(io, method="adalora", hyperparameters={"max_steps": 4, "checkpoint_steps": 2})
    assert io.metric_values("rewards/margins")[-1][1] > 0
    model = result.trained_model
    assert model is not None and model.adapter
    assert not any(p.name == "ref" for p in io.work_dir.rglob("*"))
    io.models["ft:tiny-gpt2:ada:1"] = ResolvedModel(
        ref=str(model.path), adapter_of=str(tiny_model_dir)
    )
    with pytest.raises(PermanentJobError, match="cannot train an AdaLoRA adapter further"):
        run(io, base_model="ft:tiny-gpt2:ada:1", method="adalora")


def test_a_supervised_dataset_cannot_train_dpo(io: MemoryTrainingIO) -> None:
    text = io.add_dataset(DatasetSchema.TEXT, [{"text": "Fresh bread."}] * 4)
    with pytest.raises(PermanentJobError, match=r"objective 'dpo'.*needs preference"):
        run(io, training_dataset=text)


def test_pairs_are_cut_and_rendered_like_supervised_rows(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    conversation = {
        "prompt": [{"role": "user", "content": "Fresh bread?"}],
        "chosen": [{"role": "assistant", "content": "Every morning."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    plain = encode_preference(tok, conversation, max_length=64)
    assert tok.decode(plain["prompt_ids"]) == "user: Fresh bread?\n"
    assert tok.decode(plain["chosen_ids"]) == "assistant: Every morning."
    tok.chat_template = CHAT_TEMPLATE
    templated = encode_preference(tok, conversation, max_length=64)
    assert tok.decode(templated["prompt_ids"]) == "<|user|>Fresh bread?\n<|assistant|>"
    assert tok.decode(templated["rejected_ids"]) == "No.\n"

    long = {"prompt": "Fresh bread " * 40, "chosen": " every morning " * 40, "rejected": " no"}
    cut = encode_preference(tok, long, max_length=32)
    assert len(cut["prompt_ids"]) + len(cut["chosen_ids"]) == 32
    assert len(cut["chosen_ids"]) == 16  # the answers keep half
    assert cut["prompt_ids"] == encode_preference(tok, long, max_length=4096)["prompt_ids"][-16:]
