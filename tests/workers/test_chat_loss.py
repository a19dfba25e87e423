"""Chat rows train on the assistant's messages only, as OpenAI's fine-tuning does: the
system and user turns carry no loss, an assistant message with `weight` 0 none either, and
each learned message keeps its end-of-turn marker (so the model learns to stop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from core.enums import DatasetSchema
from tests.support.tiny_model import CHAT_TEMPLATE
from workers.training.data import IGNORE_INDEX, encode_chat, encode_rows

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello mug"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "blue coffee", "weight": 0},
    {"role": "user", "content": "and"},
    {"role": "assistant", "content": "warm bread"},
]
# SmolLM2's way: a default system message when the conversation has none
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages and messages[0]['role'] != 'system' %}<|system|>Be kind.\n{% endif %}"
    + CHAT_TEMPLATE
)


def learned_text(tokenizer: Any, feature: dict[str, Any]) -> str:
    pairs = zip(feature["input_ids"], feature["labels"], strict=True)
    return str(tokenizer.decode([i for i, label in pairs if label != IGNORE_INDEX]))


@pytest.fixture
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_a_templated_conversation_learns_its_assistant_turns_and_their_ends(
    tokenizer: Any,
) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    feature = encode_chat(tokenizer, CONVERSATION, 256)
    assert learned_text(tokenizer, feature) == "hello mug\nwarm bread\n"
    whole = tokenizer.decode(feature["input_ids"])
    assert whole.startswith("<|system|>Be brief.\n<|user|>hi there\n<|assistant|>hello mug")


def test_a_default_system_message_and_an_opening_assistant_turn_are_placed(
    tokenizer: Any,
) -> None:
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    opening = [{"role": "assistant", "content": "welcome"}, {"role": "user", "content": "hi"}]
    feature = encode_chat(tokenizer, opening, 256)
    assert tokenizer.decode(feature["input_ids"]).startswith("<|system|>Be kind.\n")
    assert "Be kind" not in learned_text(tokenizer, feature)
    assert "welcome" in learned_text(tokenizer, feature)
    assert "hi" not in learned_text(tokenizer, feature).replace("welcome", "")


def test_without_a_template_the_answers_and_the_closing_eos_are_learned(tokenizer: Any) -> None:
    tokenizer.eos_token = "<pad>"
    feature = encode_chat(tokenizer, CONVERSATION, 256)
    assert tokenizer.decode(feature["input_ids"]).endswith("assistant: warm bread<pad>")
    assert learned_text(tokenizer, feature) == " hello mug warm bread<pad>"
    assert feature["labels"][-1] == tokenizer.eos_token_id


def test_a_template_that_rewrites_earlier_turns_learns_the_whole_conversation(
    tokenizer: Any,
) -> None:
    # the last assistant turn is rendered differently from the same turn with one after it
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]"
        "{% else %}{{ m['content'] }};{% endif %}{% endfor %}"
    )
    feature = encode_chat(tokenizer, CONVERSATION, 256)
    assert feature["labels"] == feature["input_ids"]


def test_a_cut_keeps_the_labels_of_the_tokens_it_keeps(tokenizer: Any) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    whole = encode_chat(tokenizer, CONVERSATION, 256)
    cut = encode_chat(tokenizer, CONVERSATION, 12)
    assert cut["input_ids"] == whole["input_ids"][:12]
    assert cut["labels"] == whole["labels"][:12]


def test_a_row_whose_answers_all_weigh_nothing_is_not_trained_on(tokenizer: Any) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    silent = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in CONVERSATION]
    rows = [{"messages": CONVERSATION}, {"messages": silent}]
    features = encode_rows(tokenizer, DatasetSchema.CHAT, rows, [], 256)
    assert len(features) == 1
    assert learned_text(tokenizer, features[0]) == "hello mug\nwarm bread\n"


def test_train_on_inputs_learns_the_whole_conversation_and_the_prompt(tokenizer: Any) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    chat = encode_chat(tokenizer, CONVERSATION, 256, train_on_inputs=True)
    assert chat["labels"] == chat["input_ids"]
    silent = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in CONVERSATION]
    rows = [{"prompt": "Q: mug?", "completion": " blue"}]
    [pair] = encode_rows(tokenizer, DatasetSchema.PROMPT_COMPLETION, rows, [], 64, True)
    assert pair["labels"] == pair["input_ids"]
    kept = encode_rows(tokenizer, DatasetSchema.CHAT, [{"messages": silent}], [], 256, True)
    assert len(kept) == 1  # nothing weighs anything, yet the inputs are learned
