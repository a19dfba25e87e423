"""How a training example becomes token ids, and what a dataset's examples count.

The rules live here, not in the trainer, so that the API (counting a dataset's tokens with
api.tokenizers' tokenizer, which never imports transformers) and the workers (training with a
transformers tokenizer, workers/training/data.py) encode a row the same way. `tokenizer` is
either of them: it answers `tokenizer(text, text_pair, add_special_tokens=...)["input_ids"]`,
`tokenizer(words, is_split_into_words=True)["input_ids"]`, `eos_token_id`, `chat_template` and
`apply_chat_template(messages, tokenize=False)`.

The ids here are an example's whole encoding; training cuts them to `max_length`
(workers/training/data.py says how each schema is cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.enums import LABELLED_SCHEMAS, SCHEMAS_FOR_TASK, DatasetSchema

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


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[str, bool]:
    """The conversation as text, and whether it came from the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(list(messages), tokenize=False)), True
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages), False


ASSISTANT_TURN = "\nassistant:"
"""Where the assistant's turn starts in a conversation rendered without a chat template."""


def render_generation_prompt(
    tokenizer: Any, messages: Sequence[dict[str, Any]]
) -> tuple[str, bool]:
    """The conversation as text ending where the assistant's answer starts (the template's
    generation prompt, or `role: content` lines then `assistant:`), and whether it came from
    the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return str(text), True
    return render_chat(tokenizer, messages)[0] + ASSISTANT_TURN, False


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The rendered template, whose text holds its own special tokens; without a template,
    `role: content` lines encoded as a text."""
    text, templated = render_chat(tokenizer, messages)
    return token_ids(tokenizer, text, False) if templated else text_ids(tokenizer, text)


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
        return chat_ids(tokenizer, row["messages"])
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
    tokens_kept: int  # what one epoch over every example trains on, after the cuts


def count_tokens(
    tokenizer: Any, schema: DatasetSchema, rows: Sequence[dict[str, Any]], max_length: int
) -> TokenCounts:
    """Token counts of `rows` (at least one) encoded as training encodes them."""
    lengths = [len(example_ids(tokenizer, schema, row)) for row in rows]
    if not lengths:
        raise ValueError("no rows to count")
    total = sum(lengths)
    return TokenCounts(
        examples=len(lengths),
        tokens=total,
        min_tokens=min(lengths),
        mean_tokens=round(total / len(lengths), 2),
        max_tokens=max(lengths),
        max_length=max_length,
        truncated=sum(1 for n in lengths if n > max_length),
        tokens_kept=sum(min(n, max_length) for n in lengths),
    )
