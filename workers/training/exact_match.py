"""Exact match of generated completions: a causal LM's task metric beside its loss.

The teacher-forced loss says how likely the reference completion is; exact match says
whether the model, completing the prompt itself, writes it. At every evaluation of a spec
with `exact_match` (core.specs.ExactMatchSpec), the model completes the prompts of the
first validation rows greedily, and `eval_exact_match` is the share of completions equal
to their reference once surrounding whitespace is stripped.

Prompts are encoded as training encodes the rows (core.example_tokens): a prompt_completion
row's prompt with the tokenizer's special tokens; a chat row's conversation before its last
assistant turn, rendered by the chat template with the generation prompt (without one, as
`role: content` lines ending with `assistant:`). Completions end at eos or at
`max_new_tokens`. Each training process scores its share of the rows and the counts are
summed, so every process logs the same figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.enums import COMPLETION_SCHEMAS, DatasetSchema, FailureType
from core.errors import PermanentJobError
from core.example_tokens import render_generation_prompt, token_ids
from core.specs import ExactMatchSpec


@dataclass(frozen=True)
class ExactMatchSet:
    """Prompt ids and the reference completion of each scored validation row."""

    prompts: list[list[int]]
    references: list[str]
    max_new_tokens: int

    def __len__(self) -> int:
        return len(self.prompts)


def _chat_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[list[int], str]:
    """The ids of the conversation before its last assistant turn, and that turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text, templated = render_generation_prompt(tokenizer, messages[:last])
    # a template's text holds its own special tokens (as core.example_tokens.chat_ids reads it)
    return token_ids(tokenizer, text, not templated), str(messages[last]["content"])


def exact_match_set(
    tokenizer: Any,
    schema: DatasetSchema,
    rows: Sequence[dict[str, Any]],
    settings: ExactMatchSpec,
    max_length: int,
) -> ExactMatchSet:
    """The first `settings.examples` rows that have a completion to compare. A prompt longer
    than `max_length - max_new_tokens` loses its start, as training cuts prompts."""
    if schema not in COMPLETION_SCHEMAS:
        raise PermanentJobError(
            f"exact_match needs prompt_completion or chat validation rows, not {schema.value} "
            "rows (they have no completion to compare)",
            FailureType.INVALID_SPEC,
        )
    keep = max(max_length - settings.max_new_tokens, 1)
    prompts: list[list[int]] = []
    references: list[str] = []
    for row in rows:
        if len(prompts) == settings.examples:
            break
        if schema is DatasetSchema.PROMPT_COMPLETION:
            ids, reference = token_ids(tokenizer, row["prompt"], True), str(row["completion"])
        elif any(m["role"] == "assistant" for m in row["messages"]):
            ids, reference = _chat_prompt(tokenizer, row["messages"])
        else:
            continue
        prompts.append(ids[-keep:])
        references.append(reference)
    if not prompts:
        raise PermanentJobError(
            "exact_match found no validation row with an assistant turn to compare",
            FailureType.INVALID_SPEC,
        )
    return ExactMatchSet(prompts, references, settings.max_new_tokens)


def same_text(completion: str, reference: str) -> bool:
    return completion.strip() == reference.strip()


def count_matches(
    model: Any,
    tokenizer: Any,
    scored: ExactMatchSet,
    indices: Sequence[int],
    batch_size: int,
    pad_id: int,
) -> int:
    """How many of the rows at `indices` the model completes exactly, generating greedily
    in left-padded batches of `batch_size`."""
    device = next(model.parameters()).device
    matches = 0
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = [scored.prompts[i] for i in indices[start : start + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor(
                [[pad_id] * (width - len(ids)) + ids for ids in batch], device=device
            )
            attention = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device
            )
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=scored.max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for index, text in zip(indices[start : start + batch_size], texts, strict=True):
                matches += same_text(text, scored.references[index])
    return matches
