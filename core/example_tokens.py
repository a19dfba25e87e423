"""How a training example becomes token ids, and what a dataset's examples count.

The rules live here, not in the trainer, so that the API (counting a dataset's tokens with
api.tokenizers' tokenizer, which never imports transformers) and the workers (training with a
transformers tokenizer, workers/training/data.py) encode a row the same way. `tokenizer` is
either of them: it answers `tokenizer(text, text_pair, add_special_tokens=...)["input_ids"]`,
`tokenizer(words, is_split_into_words=True)["input_ids"]`, `eos_token_id`, `chat_template` and
`apply_chat_template(messages, tools=..., tokenize=False)`.

The ids here are an example's whole encoding; training cuts them to `max_length`
(workers/training/data.py says how each schema is cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.enums import LABELLED_SCHEMAS, SCHEMAS_FOR_TASK, DatasetSchema
from core.tools import TOOL_LIST, template_conversation

Tools = list[dict[str, Any]] | None  # function tools as a chat template takes them

TRAINING_SCHEMAS: frozenset[DatasetSchema] = frozenset().union(*SCHEMAS_FOR_TASK.values())
"""Schemas whose rows are training examples (a batch request file's are not)."""


def eos_ids(tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return [int(eos)] if eos is not None else []


def token_ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """A text with the tokenizer's special tokens, then eos."""
    return token_ids(tokenizer, text, True) + eos_ids(tokenizer)


def prompt_completion_ids(
    tokenizer: Any, prompt: str, completion: str
) -> tuple[list[int], list[int]]:
    """The prompt with special tokens; the completion without, then eos."""
    return token_ids(tokenizer, prompt, True), token_ids(tokenizer, completion, False) + eos_ids(
        tokenizer
    )


def chat_conversation(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Tools = None
) -> tuple[list[dict[str, Any]], Tools]:
    """A chat row's messages and function tools (its `tools`, OpenAI's shape) as the
    tokenizer's chat template takes them (core.tools.template_conversation: the tools shown
    by the template, or in the system message; an assistant's calls as the template renders
    them, or as JSON text)."""
    defined = TOOL_LIST.validate_python(tools) if tools else None
    template = getattr(tokenizer, "chat_template", None) or ""
    return template_conversation(messages, defined, template)


def render_chat(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Tools = None
) -> tuple[str, bool]:
    """The conversation as text, and whether it came from the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False)
        return str(text), True
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages), False


ASSISTANT_TURN = "\nassistant:"
"""Where the assistant's turn starts in a conversation rendered without a chat template."""


def render_generation_prompt(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Tools = None
) -> tuple[str, bool]:
    """The conversation as text ending where the assistant's answer starts (the template's
    generation prompt, or `role: content` lines then `assistant:`), and whether it came from
    the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            list(messages), tools=tools, tokenize=False, add_generation_prompt=True
        )
        return str(text), True
    return render_chat(tokenizer, messages)[0] + ASSISTANT_TURN, False


def learned(message: dict[str, Any]) -> bool:
    """Whether training learns a message: an assistant's, unless its `weight` is 0."""
    return bool(message["role"] == "assistant" and message.get("weight", 1) != 0)


def assistant_spans(
    tokenizer: Any, messages: Sequence[dict[str, Any]], text: str, tools: Tools = None
) -> list[tuple[int, int]] | None:
    """Where the learned assistant messages (see `learned`) stand in `text`, the
    conversation as `render_chat` renders it, as character spans: from the end of the
    generation prompt before the message to the end of the conversation up to it (so the
    template's end-of-turn marker is learned too). None when the rendering is not made of
    those prefixes (a template that renders earlier turns differently once later ones follow)."""
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if not learned(message):
            continue
        start = (
            render_generation_prompt(tokenizer, messages[:i], tools)[0]
            if i
            else _opening(tokenizer, tools)
        )
        end = render_chat(tokenizer, messages[: i + 1], tools)[0]
        if not i and not (start and text.startswith(start)):  # it opens the conversation
            start = end[: max(end.rfind(str(message["content"])), 0)]
        if not (text.startswith(end) and end.startswith(start)):
            return None
        spans.append((len(start), len(end)))
    return spans


def _opening(tokenizer: Any, tools: Tools = None) -> str:
    """The generation prompt of an empty conversation ("" when the template cannot render one)."""
    try:
        return render_generation_prompt(tokenizer, [], tools)[0]
    except Exception:  # a template's own error on no messages (jinja2's, or one it raises)
        return ""


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Tools = None) -> list[int]:
    """The rendered template, whose text holds its own special tokens; without a template,
    `role: content` lines encoded as a text."""
    text, templated = render_chat(tokenizer, messages, tools)
    return token_ids(tokenizer, text, False) if templated else text_ids(tokenizer, text)


def learned_tokens(
    tokenizer: Any, messages: Sequence[dict[str, Any]], ids: Sequence[int], tools: Tools = None
) -> list[bool] | None:
    """Which of a conversation's `chat_ids` training learns: those that start inside a
    learned message's span (`assistant_spans`); the eos a conversation without a template
    ends with goes with its last message. None where the tokens cannot be placed (a
    tokenizer without offsets, a template not made of prefixes): training then learns
    the whole conversation."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    text, templated = render_chat(tokenizer, messages, tools)
    spans = assistant_spans(tokenizer, messages, text, tools)
    if spans is None:
        return None
    encoded = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
    offsets = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    if not templated:
        offsets += [(len(text), len(text))] * len(eos_ids(tokenizer))
    given = list(encoded["input_ids"])
    if len(offsets) != len(ids) or given != list(ids[: len(given)]):
        return None  # not the encoding chat_ids made
    closing = not templated and learned(messages[-1])
    return [
        (end > start and any(s <= start < e for s, e in spans))
        or (closing and start == end == len(text))
        for start, end in offsets
    ]


def _keeps_a_learned_token(
    tokenizer: Any, schema: DatasetSchema, row: dict[str, Any], ids: Sequence[int], cut: int
) -> bool:
    """Whether training keeps a row cut to `cut` tokens: a chat row needs a learned token
    left (the other language-model rows always keep one: a prompt/completion row keeps its
    completion, a text row learns every token)."""
    if schema is not DatasetSchema.CHAT:
        return True
    if not any(learned(m) for m in row["messages"]):
        return False
    if len(ids) <= cut:
        return True
    messages, tools = chat_conversation(tokenizer, row["messages"], row.get("tools"))
    mask = learned_tokens(tokenizer, messages, ids, tools)
    return mask is None or any(mask[:cut])


def example_ids(tokenizer: Any, schema: DatasetSchema, row: dict[str, Any]) -> list[int]:
    """The input ids a training row encodes to, before training cuts them to max_length.
    Classification rows are the tokenizer's (pair) encoding with special tokens, tagged
    rows its encoding of the words."""
    if schema is DatasetSchema.TEXT:
        return text_ids(tokenizer, row["text"])
    if schema is DatasetSchema.PROMPT_COMPLETION:
        prompt, completion = prompt_completion_ids(tokenizer, row["prompt"], row["completion"])
        return prompt + completion
    if schema is DatasetSchema.CHAT:
        return chat_ids(tokenizer, *chat_conversation(tokenizer, row["messages"], row.get("tools")))
    if schema in LABELLED_SCHEMAS:
        return list(tokenizer(row["text"], row.get("text_pair"))["input_ids"])
    if schema is DatasetSchema.TOKEN_CLASSIFICATION:
        return list(tokenizer(list(row["tokens"]), is_split_into_words=True)["input_ids"])
    raise ValueError(f"{schema.value} rows are not training examples")


@dataclass(frozen=True)
class TokenCounts:
    """A dataset's examples as one tokenizer counts them, against a `max_length`."""

    examples: int
    tokens: int  # over every example, whole
    min_tokens: int
    mean_tokens: float
    max_tokens: int
    max_length: int
    truncated: int  # examples longer than max_length: training cuts them
    tokens_kept: int  # what one epoch trains on: the examples training keeps, after the cuts


def count_tokens(
    tokenizer: Any, schema: DatasetSchema, rows: Sequence[dict[str, Any]], max_length: int
) -> TokenCounts:
    """Token counts of `rows` (at least one) encoded as training encodes them."""
    encoded = [example_ids(tokenizer, schema, row) for row in rows]
    lengths = [len(ids) for ids in encoded]
    if not lengths:
        raise ValueError("no rows to count")
    total = sum(lengths)
    kept = [
        min(len(ids), max_length)
        for row, ids in zip(rows, encoded, strict=True)
        if _keeps_a_learned_token(tokenizer, schema, row, ids, max_length)
    ]
    return TokenCounts(
        examples=len(lengths),
        tokens=total,
        min_tokens=min(lengths),
        mean_tokens=round(total / len(lengths), 2),
        max_tokens=max(lengths),
        max_length=max_length,
        truncated=sum(1 for n in lengths if n > max_length),
        tokens_kept=sum(kept),
    )
