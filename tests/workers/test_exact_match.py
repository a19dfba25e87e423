"""Exact match of generated completions (causal LM): the held-out prompts, the scoring with
a real tiny GPT-2, and a fine-tune whose kept checkpoint is picked by it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.enums import DatasetSchema
from core.errors import PermanentJobError
from core.settings import Settings
from core.specs import ExactMatchSpec
from tests.conftest import TINY_MODEL
from tests.support.memory_io import MemoryTrainingIO
from tests.support.tiny_model import with_chat_template
from workers.context import RunContext
from workers.training.exact_match import count_matches, exact_match_set
from workers.training.runner import FineTuneRunner

PROMPT, COMPLETION = "The blue mug", " keeps coffee"  # 5 tokens; the tiny model has no eos


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_prompts_are_encoded_as_training_encodes_them(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"prompt": f"row {i}", "completion": f" answer {i}"} for i in range(5)]
    scored = exact_match_set(
        tokenizer, DatasetSchema.PROMPT_COMPLETION, rows, ExactMatchSpec(examples=3), 128
    )
    assert len(scored) == 3  # the first `examples` rows
    assert scored.prompts[1] == tokenizer("row 1")["input_ids"]
    assert scored.references == [" answer 0", " answer 1", " answer 2"]

    # a long prompt loses its start: room is left for max_new_tokens within max_length
    long = [{"prompt": "The blue mug " * 40, "completion": "x"}]
    cut = exact_match_set(
        tokenizer,
        DatasetSchema.PROMPT_COMPLETION,
        long,
        ExactMatchSpec(max_new_tokens=20),
        64,
    )
    assert len(cut.prompts[0]) == 44
    assert cut.prompts[0] == tokenizer(long[0]["prompt"])["input_ids"][-44:]

    chat = [
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn: skipped
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "goodbye"},
            ]
        },
    ]
    plain = exact_match_set(tokenizer, DatasetSchema.CHAT, chat, ExactMatchSpec(), 128)
    assert plain.references == ["goodbye"]  # the last assistant turn
    assert tokenizer.decode(plain.prompts[0]) == (
        "system: be brief\nuser: hi\nassistant: hello\nuser: bye\nassistant:"
    )
    templated_dir = with_chat_template(Path(tokenizer.name_or_path), tmp_path / "chat")
    templated = AutoTokenizer.from_pretrained(templated_dir)
    scored = exact_match_set(templated, DatasetSchema.CHAT, chat, ExactMatchSpec(), 128)
    assert templated.decode(scored.prompts[0]).endswith("<|user|>bye\n<|assistant|>")

    with pytest.raises(PermanentJobError, match="prompt_completion or chat"):
        exact_match_set(tokenizer, DatasetSchema.TEXT, [{"text": "a"}], ExactMatchSpec(), 128)
    with pytest.raises(PermanentJobError, match="no validation row"):
        exact_match_set(tokenizer, DatasetSchema.CHAT, chat[:1], ExactMatchSpec(), 128)


def test_a_completion_counts_when_the_greedy_text_equals_the_reference(
    tiny_model_dir: Path, tokenizer: Any
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = ["The blue mug", "Fresh bread every morning at the", "Our support"]
    rows = [{"prompt": p, "completion": "?"} for p in prompts]
    settings = ExactMatchSpec(max_new_tokens=4)
    scored = exact_match_set(tokenizer, DatasetSchema.PROMPT_COMPLETION, rows, settings, 128)
    # what the untrained model writes greedily, one prompt at a time
    greedy = []
    for ids in scored.prompts:
        out = model.generate(
            input_ids=model.dummy_inputs["input_ids"].new_tensor([ids]),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        greedy.append(tokenizer.decode(out[0, len(ids) :]))
    references = [f"  {greedy[0]} ", greedy[1], greedy[2] + " and more"]
    scored = type(scored)(scored.prompts, references, 4)
    # in one left-padded batch (prompts of different lengths) and one by one: the same
    pad = tokenizer.pad_token_id
    assert count_matches(model, tokenizer, scored, [0, 1, 2], 3, pad) == 2
    assert count_matches(model, tokenizer, scored, [0, 1, 2], 1, pad) == 2
    assert count_matches(model, tokenizer, scored, [2], 1, pad) == 0


def test_exact_match_is_an_evaluation_metric_that_picks_the_model(
    io: MemoryTrainingIO,
) -> None:
    rows = [{"prompt": PROMPT, "completion": COMPLETION}] * 16
    training = io.add_dataset(DatasetSchema.PROMPT_COMPLETION, rows)
    spec = {
        "base_model": TINY_MODEL,
        "task": "causal_lm",
        "training_dataset": training,
        "validation_dataset": io.add_dataset(DatasetSchema.PROMPT_COMPLETION, rows[:2]),
        "exact_match": {"max_new_tokens": 5},
        "metric_for_best_model": "exact_match",
        "hyperparameters": {
            "batch_size": 4,
            "learning_rate": 1e-2,
            "max_steps": 30,
            "eval_steps": 10,
        },
    }
    ctx = RunContext(job_id=io.job_id, attempt=1, device="cpu")
    result = FineTuneRunner(Settings(data_dir=io.work_dir), lambda _: io).run(spec, ctx)
    assert result.result is not None
    shares = dict(io.metric_values("eval_exact_match"))
    assert sorted(shares) == [10, 20, 30]
    assert set(shares.values()) <= {0.0, 0.5, 1.0}
    assert shares[30] == 1.0  # the repeated completion is learnt by the end
    best = result.result["best_checkpoint"]
    assert best["metric"] == "eval_exact_match" and best["score"] == 1.0
    assert best["step"] == min(step for step, share in shares.items() if share == 1.0)
    assert result.result["eval"]["exact_match"] == 1.0
    assert result.trained_model is not None
    assert result.trained_model.metrics["exact_match"] == 1.0
