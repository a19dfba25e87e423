"""Turning a generation spec's prompts into token ids, and checking they fit the model.

Shared by the API (to refuse a job before it is queued) and the workers (which
encode the same way before decoding). `tokenizer` is a transformers tokenizer, or the
API's api.tokenizers.LocalTokenizer, which answers the same calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.specs import GenerateSpec
from core.tools import CALL_CLOSE, CALL_OPEN, Tool, template_conversation, writes_calls


class PromptError(ValueError):
    def __init__(self, message: str, param: str, *, too_long: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.too_long = too_long  # the prompt and its max new tokens exceed the context


def context_length(config: Any) -> int | None:
    """The most positions a model's config allows, when it says: a transformers config, or
    the mapping read from its config.json."""
    for attr in ("max_position_embeddings", "n_positions"):
        value = config.get(attr) if isinstance(config, Mapping) else getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _chat_ids(
    tokenizer: Any, conversation: list[dict[str, Any]], tools: list[Tool] | None = None
) -> list[int]:
    messages, definitions = template_conversation(conversation, tools, tokenizer.chat_template)
    text = tokenizer.apply_chat_template(
        messages, tools=definitions, tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(tokenizer: Any, spec: GenerateSpec, limit: int | None) -> list[list[int]]:
    """Token ids per prompt (or conversation); PromptError when one cannot be served."""
    if spec.uses_chat_template and not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"model {spec.model!r} has no chat template; send plain prompts with chat=false",
            "spec.messages" if spec.messages is not None else "spec.chat",
        )
    if spec.tool_choice == "auto" and not writes_calls(getattr(tokenizer, "chat_template", None)):
        raise PromptError(
            f"tool_choice auto needs a model whose chat template shows the tools and the "
            f"{CALL_OPEN}...{CALL_CLOSE} call format (as Qwen's, SmolLM3's or Hermes' do); "
            f"{spec.model!r}'s does not: send tool_choice required or a named function",
            "spec.tool_choice",
        )
    if spec.messages is not None:
        field = "messages"
        encoded = [
            _chat_ids(tokenizer, [m.model_dump() for m in c], spec.tools) for c in spec.messages
        ]
    elif spec.chat:
        field = "prompts"
        encoded = [
            _chat_ids(tokenizer, [{"role": "user", "content": p}], spec.tools)
            for p in spec.prompts or []
        ]
    elif spec.prompt_token_ids is not None:
        field = "prompt_token_ids"
        encoded = [list(ids) for ids in spec.prompt_token_ids]
    else:
        field = "prompts"
        encoded = [list(tokenizer(p)["input_ids"]) for p in spec.prompts or []]
    for index, ids in enumerate(encoded):
        if not ids:
            raise PromptError(f"prompt {index} encodes to no tokens", f"spec.{field}[{index}]")
        new_tokens = max_new_tokens(spec, len(ids), limit)
        if limit is not None and len(ids) + new_tokens > limit:
            raise PromptError(
                f"prompt {index} is {len(ids)} tokens; with max_new_tokens "
                f"{new_tokens} it exceeds the model's context of {limit} tokens",
                f"spec.{field}[{index}]",
                too_long=True,
            )
    return encoded


def max_new_tokens(spec: GenerateSpec, prompt_tokens: int, limit: int | None) -> int:
    """The most new tokens a prompt of `prompt_tokens` gets: the spec's max_new_tokens, or
    with fit_max_new_tokens what the context leaves after the prompt (at least one: a prompt
    that fills the context is refused)."""
    if limit is None or not spec.fit_max_new_tokens:
        return spec.max_new_tokens
    return max(1, min(spec.max_new_tokens, limit - prompt_tokens))


def vocabulary_error(spec: GenerateSpec, vocab_size: int) -> PromptError | None:
    """A token id the spec names (a prompt's, a logit bias's) that the model does not have:
    it scores ids 0 to vocab_size - 1."""
    for index, ids in enumerate(spec.prompt_token_ids or []):
        outside = [t for t in ids if t >= vocab_size]
        if outside:
            return PromptError(
                f"prompt {index}: token id {outside[0]} is not in the model's vocabulary "
                f"(ids 0 to {vocab_size - 1})",
                f"spec.prompt_token_ids[{index}]",
            )
    outside = [t for t in spec.logit_bias if t >= vocab_size]
    if outside:
        return PromptError(
            f"logit_bias: token id {outside[0]} is not in the model's vocabulary "
            f"(ids 0 to {vocab_size - 1})",
            "spec.logit_bias",
        )
    return None
