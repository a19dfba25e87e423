"""Reinforcement fine-tuning (objective reinforcement) in-process on the tiny GPT-2: TRL's
GRPOTrainer with the runner's checkpoints, metrics and stop/resume, the grader's mean score
recorded per step, and prompts rendered like chat rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from core.enums import DatasetSchema
from core.errors import JobStopped, PermanentJobError
from core.example_tokens import render_generation_prompt
from core.settings import Settings
from core.specs import FineTuneSpec
from tests.support.memory_io import MemoryTrainingIO, StopAtStep
from tests.support.tiny_model import CHAT_TEMPLATE
from workers.context import RunContext
from workers.runners import RunResult
from workers.training.grading import GRADER_MEAN_METRIC
from workers.training.reinforcement import encode_prompts
from workers.training.runner import FineTuneRunner

GPT2 = "tiny-gpt2"
PROMPTS = [
    {"messages": [{"role": "user", "content": "Fresh bread?"}], "answer": "every morning"},
    {"messages": [{"role": "user", "content": "Our support team"}], "answer": "answers"},
]
# Half of it from any completion that contains an "e", half from its likeness to the answer.
GRADER = {
    "type": "multi",
    "name": "bakery",
    "graders": {
        "has_e": {
            "type": "string_check",
            "name": "has e",
            "input": "{{sample.output_text}}",
            "reference": "e",
            "operation": "ilike",
        },
        "close": {
            "type": "text_similarity",
            "name": "close",
            "input": "{{ sample.output_text }}",
            "reference": "{{item.answer}}",
            "evaluation_metric": "fuzzy_match",
        },
    },
    "calculate_output": "(has_e + close) / 2",
}


def run(
    io: MemoryTrainingIO,
    ctx: RunContext | None = None,
    hyperparameters: dict[str, Any] | None = None,
    **spec: Any,
) -> RunResult:
    hp = {"batch_size": 2, "learning_rate": 1e-2, "max_steps": 2, **(hyperparameters or {})}
    merged = {
        "base_model": GPT2,
        "task": "causal_lm",
        "objective": "reinforcement",
        "reinforcement": {"grader": GRADER, "generations": 2, "max_completion_tokens": 4},
        "training_dataset": io.add_dataset(DatasetSchema.REINFORCEMENT, PROMPTS * 2),
        "validation_split": 0.0,
        "hyperparameters": hp,
        **spec,
    }
    ctx = ctx or RunContext(job_id=io.job_id, attempt=1, device="cpu")
    return FineTuneRunner(Settings(data_dir=io.work_dir), lambda _: io).run(merged, ctx)


def test_grpo_records_the_graders_mean_score_per_step_and_resumes(io: MemoryTrainingIO) -> None:
    hp = {"max_steps": 3, "checkpoint_steps": 2}
    with pytest.raises(JobStopped):
        run(io, StopAtStep(io.job_id, step=2), hyperparameters=hp, method="lora")
    assert [c.step for c in io.recorded_checkpoints] == [2]

    result = run(io, hyperparameters=hp, method="lora")
    assert result.result is not None and result.result["resumed_from_step"] == 2
    scores = io.metric_values(GRADER_MEAN_METRIC)
    assert [step for step, _ in scores] == [1, 2, 3]  # step 3 after the resume
    assert all(0.0 <= value <= 1.0 for _, value in scores), scores
    rewards = dict(io.metric_values("reward"))
    assert all(rewards[step] == pytest.approx(value) for step, value in scores)  # weight 1
    started = [d for m, d in io.events if m == "training started"][-1]
    assert started is not None and started["objective"] == "reinforcement"
    assert started["estimate"]["tokens"] > 0

    assert result.result["objective"] == "reinforcement"
    assert result.result["trained_tokens"] > 0
    report = result.result["eval"]
    assert 0.0 <= report["reward"] <= 1.0 and report["rewards/grader/mean"] == report["reward"]
    assert result.result["best_checkpoint"]["metric"] == "eval_reward"
    model = result.trained_model
    assert model is not None and model.adapter
    assert "adapter_model.safetensors" in {p.name for p in model.path.iterdir()}


def test_a_row_without_a_field_the_grader_names_fails_the_job(io: MemoryTrainingIO) -> None:
    rows = [*PROMPTS, {"messages": [{"role": "user", "content": "Hi"}], "other": "x"}]
    with pytest.raises(PermanentJobError, match=r"row 3 .* no field answer"):
        run(io, training_dataset=io.add_dataset(DatasetSchema.REINFORCEMENT, rows))


def test_prompts_end_where_the_assistant_answers(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_generation_prompt(tok, messages)[0] == "system: Be brief.\nuser: Hi\nassistant:"
    tok.chat_template = CHAT_TEMPLATE
    assert (
        render_generation_prompt(tok, messages)[0]
        == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    )
    spec = FineTuneSpec.model_validate(
        {
            "base_model": GPT2,
            "task": "causal_lm",
            "objective": "reinforcement",
            "training_dataset": "ds_" + "0" * 32,
            "reinforcement": {"grader": GRADER, "generations": 3, "max_completion_tokens": 5},
        }
    )
    (feature,) = encode_prompts(tok, PROMPTS[:1], spec, "ds_x")
    prompt_tokens = len(tok(feature["prompt"])["input_ids"])
    assert feature["tokens_at_most"] == 3 * (prompt_tokens + 5)
    assert '"answer": "every morning"' in feature["item"]
    long = [{"messages": [{"role": "user", "content": "Fresh bread " * 40}], "answer": "x"}]
    short = spec.model_copy(
        update={"hyperparameters": spec.hyperparameters.model_copy(update={"max_length": 48})}
    )
    (cut,) = encode_prompts(tok, long, short, "ds_x")
    assert cut["prompt"].endswith("bread \n<|assistant|>")
    assert not cut["prompt"].startswith("<|user|>")  # the start goes
    assert len(tok(cut["prompt"])["input_ids"]) == 48 - 5
