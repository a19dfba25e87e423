"""Chat rows train on the assistant's messages only, as OpenAI's fine-tuning does: the
system and user turns carry no loss, an assistant message with `weight` 0 none either, and
each learned message keeps its end-of-turn marker (so the model learns to stop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from core.datasets import parse_dataset
from core.enums import DatasetSchema
from core.errors import DatasetFormatError
from core.example_tokens import count_tokens
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


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
}
# OpenAI's fine-tuning rows with tools: a call made, its result given back, the answer
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "weather in Oslo"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "it is sunny"},
    ],
    "tools": [WEATHER_TOOL],
}
# shows tools and calls, as Qwen's does
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}"
    "</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def rows_of(raw: dict[str, Any]) -> list[dict[str, Any]]:
    parsed = parse_dataset((json.dumps(raw) + "\n").encode(), "tools.jsonl")
    assert parsed.schema is DatasetSchema.CHAT and parsed.report["warnings"] == []
    return parsed.rows


def test_a_row_with_tools_learns_its_calls_and_answers_not_the_tools(tokenizer: Any) -> None:
    """A template without tools gets them in the system message, and an assistant's call as
    the JSON a `required` call is decoded as: both answers are learned, nothing else."""
    tokenizer.chat_template = CHAT_TEMPLATE
    [row] = rows_of(TOOL_ROW)
    assert row["tools"] == [WEATHER_TOOL] and row["messages"][1]["tool_calls"] == [CALL]
    feature = encode_chat(tokenizer, row["messages"], 512, tools=row["tools"])
    text = tokenizer.decode(feature["input_ids"])
    assert "get_weather" in text.split("<|user|>")[0]  # the tools, in the system message
    learned = learned_text(tokenizer, feature)
    assert learned == (
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]\n' + "it is sunny\n"
    )


def test_a_template_that_renders_tools_and_calls_gets_them(tokenizer: Any) -> None:
    tokenizer.chat_template = TOOLS_TEMPLATE
    [row] = rows_of(TOOL_ROW)
    feature = encode_chat(tokenizer, row["messages"], 512, tools=row["tools"])
    text = tokenizer.decode(feature["input_ids"])
    assert text.startswith("<|system|>tools: [{")
    learned = learned_text(tokenizer, feature)
    assert learned == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        "it is sunny\n"
    )
    # the API counts the row as training encodes it
    counts = count_tokens(tokenizer, DatasetSchema.CHAT, [row], 512)
    assert counts.tokens == len(feature["input_ids"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": {"a": 1}}, "tools"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_broken_tool_rows_are_refused_with_their_line(change: dict[str, Any], message: str) -> None:
    with pytest.raises(DatasetFormatError, match=message):
        parse_dataset((json.dumps({**TOOL_ROW, **change}) + "\n").encode(), "t.jsonl")
    broken_call = {**CALL, "function": {"name": "get_weather", "arguments": "[1]"}}
    messages = [TOOL_ROW["messages"][0], {"role": "assistant", "tool_calls": [broken_call]}]
    with pytest.raises(DatasetFormatError, match=r"messages\[1\]\.tool_calls"):
        parse_dataset((json.dumps({"messages": messages}) + "\n").encode(), "t.jsonl")
    with pytest.raises(DatasetFormatError, match="has no 'content'"):
        parse_dataset((json.dumps({"messages": [{"role": "user"}]}) + "\n").encode(), "t.jsonl")
