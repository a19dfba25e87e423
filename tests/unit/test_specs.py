from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from core.enums import FineTuneTask
from core.specs import (
    TASK_HYPERPARAMETER_DEFAULTS,
    FineTuneSpec,
    GenerateJobRequest,
    GenerateSpec,
    Hyperparameters,
    default_hyperparameters,
)

GOOD: dict[str, Any] = {"model": "tiny-gpt2", "prompts": ["Hello"]}


def test_defaults() -> None:
    spec = GenerateSpec.model_validate(GOOD)
    assert spec.max_new_tokens == 64
    assert spec.do_sample
    assert spec.stop == []
    assert (spec.frequency_penalty, spec.presence_penalty) == (0.0, 0.0)
    assert spec.response_format is None


@pytest.mark.parametrize(
    "change",
    [
        {"prompts": []},
        {"prompts": ["   "]},
        {"prompts": [""]},
        {"max_new_tokens": 0},
        {"max_new_tokens": 100_000},
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"top_p": 0},
        {"top_k": -1},
        {"repetition_penalty": 0},
        {"num_return_sequences": 17},
        {"seed": 2**63},
        {"seed": -(2**63) - 1},
        {"stop": ["x"] * 9},
        {"stop": [""]},
        {"model": ""},
        {"model": "/etc/passwd"},
        {"model": "models/../../secret"},
        {"temperature": 0, "num_return_sequences": 2},
        {"unknown_field": 1},
        {"frequency_penalty": 2.1},
        {"presence_penalty": -2.5},
    ],
)
def test_rejected(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GenerateSpec.model_validate({**GOOD, **change})


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**32, 2**63 - 1])
def test_any_64_bit_seed_is_taken_and_gives_a_generator_seed(seed: int) -> None:
    """OpenAI's seed is any 64-bit integer; each sequence's generator takes what it makes."""
    import torch

    from workers.generation.engine import row_seed

    assert GenerateSpec.model_validate({**GOOD, "seed": seed}).seed == seed
    seeds = {row_seed(seed, p, s) for p in range(2) for s in range(2)}
    assert len(seeds) == 4
    for value in seeds:
        torch.Generator().manual_seed(value)


def test_request_refuses_unknown_kind_and_bad_priority() -> None:
    with pytest.raises(ValidationError):
        GenerateJobRequest.model_validate({"kind": "train", "spec": GOOD})
    with pytest.raises(ValidationError):
        GenerateJobRequest.model_validate({"kind": "generate", "spec": GOOD, "priority": 10})
    req = GenerateJobRequest.model_validate({"kind": "generate", "spec": GOOD, "priority": 9})
    assert req.priority == 9


def test_noop_request_defaults_and_bounds() -> None:
    from core.specs import NoopJobRequest, NoopSpec

    req = NoopJobRequest.model_validate({"kind": "noop"})
    assert req.spec.duration_s == 0
    with pytest.raises(ValidationError):
        NoopSpec.model_validate({"duration_s": -1})


FINETUNE: dict[str, Any] = {"base_model": "tiny-gpt2", "training_dataset": "ds_" + "0" * 32}


@pytest.mark.parametrize(
    ("task", "default", "greater"),
    [
        ("causal_lm", "eval_loss", False),
        ("sequence_classification", "eval_f1_macro", True),
        ("token_classification", "eval_f1", True),
    ],
)
def test_the_best_model_metric_defaults_per_task(task: str, default: str, greater: bool) -> None:
    spec = FineTuneSpec.model_validate({**FINETUNE, "task": task})
    assert spec.metric_for_best_model is None
    assert (spec.best_model_metric, spec.greater_is_better) == (default, greater)


@pytest.mark.parametrize(
    ("task", "metric", "name", "greater"),
    [
        ("causal_lm", "perplexity", "eval_perplexity", False),
        ("sequence_classification", "eval_accuracy", "eval_accuracy", True),
        ("sequence_classification", "loss", "eval_loss", False),
        ("token_classification", "recall", "eval_recall", True),
    ],
)
def test_the_best_model_metric_takes_either_name(
    task: str, metric: str, name: str, greater: bool
) -> None:
    spec = FineTuneSpec.model_validate({**FINETUNE, "task": task, "metric_for_best_model": metric})
    assert (spec.metric_for_best_model, spec.best_model_metric) == (name, name)
    assert spec.greater_is_better is greater
    assert FineTuneSpec.model_validate(spec.model_dump()).best_model_metric == name


@pytest.mark.parametrize(
    ("task", "metric"),
    [
        ("causal_lm", "f1"),
        ("sequence_classification", "f1"),  # classification's F1 is f1_macro or f1_weighted
        ("token_classification", "f1_macro"),
        ("causal_lm", "eval_Loss"),
    ],
)
def test_a_metric_the_task_does_not_report_is_refused(task: str, metric: str) -> None:
    with pytest.raises(ValidationError) as refused:
        FineTuneSpec.model_validate({**FINETUNE, "task": task, "metric_for_best_model": metric})
    (error,) = refused.value.errors()
    assert error["loc"] == ("metric_for_best_model",)


GRADER = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
REINFORCEMENT: dict[str, Any] = {
    **FINETUNE,
    "task": "causal_lm",
    "objective": "reinforcement",
    "reinforcement": {"grader": GRADER},
}


def test_reinforcement_defaults_and_its_best_model_metric() -> None:
    spec = FineTuneSpec.model_validate(REINFORCEMENT)
    settings = spec.reinforcement_settings
    assert (settings.generations, settings.max_completion_tokens) == (4, 64)
    assert settings.grader.item_fields == {"answer"}
    assert (spec.best_model_metric, spec.greater_is_better) == ("eval_reward", True)
    assert FineTuneSpec.model_validate(spec.model_dump()) == spec


@pytest.mark.parametrize(
    ("change", "loc", "message"),
    [
        ({"reinforcement": None}, (), "needs a reinforcement block with a grader"),
        ({"objective": "dpo"}, ("reinforcement",), "need objective reinforcement"),
        ({"task": "sequence_classification"}, ("objective",), "needs task causal_lm"),
        ({"hyperparameters": {"max_length": 64}}, (), "must be below hyperparameters.max_length"),
        ({"metric_for_best_model": "loss"}, ("metric_for_best_model",), "choose one of reward"),
        (
            {"reinforcement": {"grader": GRADER, "generations": 1}},
            ("reinforcement", "generations"),
            "",
        ),
        (
            {"reinforcement": {"grader": {**GRADER, "type": "python"}}},
            ("reinforcement", "grader", "type"),
            "no sandbox",
        ),
        (
            {"reinforcement": {"grader": GRADER, "reasoning_effort": "low"}},
            ("reinforcement", "reasoning_effort"),
            "Extra inputs",
        ),
    ],
)
def test_reinforcement_refusals(change: dict[str, Any], loc: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        FineTuneSpec.model_validate({**REINFORCEMENT, **change})
    error = refused.value.errors()[0]
    assert error["loc"] == loc and message in error["msg"]


@pytest.mark.parametrize("name", ["packing", "train_on_inputs"])
def test_off_by_default_and_for_causal_lm_supervised_only(name: str) -> None:
    base = {"base_model": "m", "training_dataset": "ds_" + "0" * 32}
    default = FineTuneSpec.model_validate({**base, "task": "causal_lm"}).hyperparameters
    assert not getattr(default, name)
    on = {"hyperparameters": {name: True}}
    spec = FineTuneSpec.model_validate({**base, "task": "causal_lm", **on})
    assert getattr(spec.hyperparameters, name)
    for task in ("sequence_classification", "token_classification"):
        with pytest.raises(ValidationError, match=f"{name} applies to task causal_lm only"):
            FineTuneSpec.model_validate({**base, "task": task, **on})
    with pytest.raises(ValidationError, match="objective supervised only, not dpo"):
        FineTuneSpec.model_validate({**base, "task": "causal_lm", "objective": "dpo", **on})


def test_token_classification_takes_its_task_defaults_where_the_request_is_silent() -> None:
    spec = FineTuneSpec.model_validate({**FINETUNE, "task": "token_classification"})
    ner = TASK_HYPERPARAMETER_DEFAULTS[FineTuneTask.TOKEN_CLASSIFICATION]
    hp = spec.hyperparameters
    assert (hp.learning_rate, hp.epochs, hp.warmup) == (
        ner["learning_rate"],
        ner["epochs"],
        ner["warmup"],
    )
    assert hp.learning_rate != Hyperparameters().learning_rate
    assert hp == default_hyperparameters(FineTuneTask.TOKEN_CLASSIFICATION)
    # the stored spec holds the values it ran with, and reads back the same
    assert FineTuneSpec.model_validate(spec.model_dump(mode="json")).hyperparameters == hp


def test_a_hyperparameter_the_request_names_beats_the_task_default() -> None:
    spec = FineTuneSpec.model_validate(
        {
            **FINETUNE,
            "task": "token_classification",
            "hyperparameters": {"learning_rate": 1e-5, "warmup": 0.0},
        }
    )
    ner = TASK_HYPERPARAMETER_DEFAULTS[FineTuneTask.TOKEN_CLASSIFICATION]
    assert (spec.hyperparameters.learning_rate, spec.hyperparameters.warmup) == (1e-5, 0.0)
    assert spec.hyperparameters.epochs == ner["epochs"]


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_tasks_without_their_own_defaults_keep_the_general_ones(task: str) -> None:
    spec = FineTuneSpec.model_validate({**FINETUNE, "task": task})
    assert spec.hyperparameters == Hyperparameters()


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"prompts": None}, "give exactly one of prompts, messages or prompt_token_ids"),
        ({"prompt_token_ids": [[1, 2]]}, "give exactly one of"),
        ({"prompts": None, "prompt_token_ids": [[1]], "chat": True}, "chat needs text prompts"),
        ({"prompts": None, "prompt_token_ids": [[]]}, "at least 1 item"),
        ({"prompts": None, "prompt_token_ids": [[-1]]}, "greater than or equal to 0"),
    ],
)
def test_prompt_token_ids_are_one_of_three_prompt_forms(spec: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        GenerateSpec.model_validate({**GOOD, **spec})


def test_prompt_token_ids_count_as_prompts_and_are_stored_only_when_given() -> None:
    spec = GenerateSpec.model_validate({**GOOD, "prompts": None, "prompt_token_ids": [[1], [2]]})
    assert spec.prompt_count == 2
    assert spec.model_dump(mode="json")["prompt_token_ids"] == [[1], [2]]
    assert "prompt_token_ids" not in GenerateSpec.model_validate(GOOD).model_dump(mode="json")


@pytest.mark.parametrize(
    ("suffix", "ok"),
    [
        ("custom_suffix", True),  # OpenAI's own example
        ("a" * 64, True),
        ("a" * 65, False),
        ("_leading", False),
        ("Upper", False),
        ("with space", False),
    ],
)
def test_a_fine_tune_suffix_is_openais_up_to_64_characters(suffix: str, ok: bool) -> None:
    base = {"task": "causal_lm", "base_model": "tiny-gpt2", "training_dataset": "ds_" + "0" * 32}
    if ok:
        assert FineTuneSpec.model_validate({**base, "suffix": suffix}).suffix == suffix
    else:
        with pytest.raises(ValidationError, match="suffix"):
            FineTuneSpec.model_validate({**base, "suffix": suffix})


def test_max_new_tokens_0_scores_the_prompts_and_needs_prompt_logprobs() -> None:
    with pytest.raises(ValidationError, match="needs prompt_logprobs"):
        GenerateSpec.model_validate({**GOOD, "max_new_tokens": 0})
    spec = GenerateSpec.model_validate({**GOOD, "max_new_tokens": 0, "prompt_logprobs": 2})
    assert (spec.max_new_tokens, spec.prompt_logprobs) == (0, 2)
