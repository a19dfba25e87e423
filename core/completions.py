"""OpenAI's completion objects built from a generation job's texts: `chat.completion` and
`text_completion` (the live serving routes and batch output lines), and the chunks of a
streamed answer (`chat.completion.chunk`, and `text_completion` chunks).

A text generated with log probabilities holds its tokens' entries in `data["logprobs"]`,
in the chat shape (`{"token", "logprob", "bytes", "top_logprobs": [...]}`): a chat choice
answers them as `{"content": [...], "refusal": null}`, a (legacy) completion choice as
`{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`, whose
top dictionaries hold the chosen token too, as OpenAI's do (keyed by token text: of two
tokens that read the same, such as two halves of characters, the more likely one stays)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from core.tools import TOOL_CALLS

LOGPROBS = "logprobs"  # in a generated text's `data`: its tokens' log probability entries
PROMPT_LOGPROBS = "prompt_logprobs"  # and its prompt's, the first with a null logprob

# An OpenAI request's sampling parameters and the GenerateSpec fields they set, as given
_SAMPLING_FIELDS = (
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("n", "num_return_sequences"),
    ("seed", "seed"),
    ("repetition_penalty", "repetition_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("presence_penalty", "presence_penalty"),
    ("logit_bias", "logit_bias"),
)


def sampling_fields(given: Callable[[str], Any]) -> dict[str, Any]:
    """The GenerateSpec fields an OpenAI completion request's sampling parameters set
    (`given(name)`: the request's value, None when absent), for the live serving routes and
    batch lines alike."""
    fields = {target: given(source) for source, target in _SAMPLING_FIELDS}
    fields = {name: value for name, value in fields.items() if value is not None}
    top_k = given("top_k")
    if top_k is not None:
        fields["top_k"] = max(top_k, 0)  # vLLM's -1 means "off", which is 0 here
    return fields


def tool_fields(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> dict[str, Any]:
    """The GenerateSpec fields an OpenAI chat request's function tools set, for the live
    serving route and batch lines alike: none without tools; with them, OpenAI's default
    choice is `auto`."""
    if not tools:
        return {}
    fields = {"tools": tools, "tool_choice": "auto" if tool_choice is None else tool_choice}
    if parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = parallel_tool_calls
    return fields


def spec_message(
    role: str,
    content: str,
    name: str | None,
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    tool_call_id: str | None = None,
) -> dict[str, Any]:
    """An OpenAI request's chat message as a GenerateSpec message, for the live serving
    routes and batch lines alike: `developer` is read as `system`; a name is kept when
    given (it reaches the chat template), an empty one is none; an assistant's tool calls
    and a tool message's call id are kept."""
    message: dict[str, Any] = {
        "role": "system" if role == "developer" else role,
        "content": content,
    }
    if name:
        message["name"] = name
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
    return message


class GeneratedText(Protocol):
    """One generated sequence: an outputs row or the engine's record of it."""

    @property
    def prompt_index(self) -> int: ...
    @property
    def sequence_index(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def finish_reason(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def data(self) -> dict[str, Any] | None: ...


def choice_index(prompt_index: int, sequence_index: int, per_prompt: int) -> int:
    """OpenAI numbers the choices of several prompts prompt by prompt, n for each."""
    return prompt_index * per_prompt + sequence_index


def usage(texts: Iterable[GeneratedText]) -> dict[str, int]:
    """Token counts: each prompt once (however many choices it has), every completion."""
    prompts: dict[int, int] = {}
    completion = 0
    for t in texts:
        prompts.setdefault(t.prompt_index, t.prompt_tokens)
        completion += t.completion_tokens
    prompt = sum(prompts.values())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def logprob_entries(text: GeneratedText) -> list[dict[str, Any]] | None:
    """A text's log probability entries; None when its request did not ask for them."""
    if text.data is None or LOGPROBS not in text.data:
        return None
    entries: list[dict[str, Any]] = text.data[LOGPROBS]
    return entries


def choice_logprobs(
    chat: bool, entries: list[dict[str, Any]] | None, text_offset: int = 0
) -> dict[str, Any] | None:
    """A choice's (or chunk's) `logprobs` for these entries; `text_offset` is where the
    first one's token starts in the completion's text (legacy shape)."""
    if entries is None:
        return None
    if chat:
        return {"content": entries, "refusal": None}
    tokens, values, offsets = [], [], []
    tops: list[dict[str, float] | None] = []
    for e in entries:
        tokens.append(e["token"])
        values.append(e["logprob"])
        if e["logprob"] is None:  # an echoed prompt's first token: nothing before it
            tops.append(None)
        else:
            top: dict[str, float] = {}
            for t in e["top_logprobs"]:  # two tokens may read the same (partial characters)
                top.setdefault(t["token"], t["logprob"])  # the more likely one stays
            top.setdefault(e["token"], e["logprob"])
            tops.append(top)
        offsets.append(text_offset)
        text_offset += len(e["token"])
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def echoed(
    text: str, data: dict[str, Any] | None, prompt: str | None
) -> tuple[str, dict[str, Any] | None]:
    """A completion's text and data with its prompt put before it, as OpenAI's `echo`: the
    prompt's text (`prompt`, or its tokens' strings when it came as token ids) and, where
    the completion has log probability entries, the prompt's before them."""
    prompt_entries: list[dict[str, Any]] = (data or {}).get(PROMPT_LOGPROBS) or []
    prefix = prompt if prompt is not None else "".join(e["token"] for e in prompt_entries)
    if data is None or LOGPROBS not in data:
        return prefix + text, data
    return prefix + text, {**data, LOGPROBS: [*prompt_entries, *data[LOGPROBS]]}


def _choice(chat: bool, index: int, text: GeneratedText) -> dict[str, Any]:
    logprobs = choice_logprobs(chat, logprob_entries(text))
    if chat:
        calls = (text.data or {}).get(TOOL_CALLS)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if calls and not text.text else text.text,
            "refusal": None,
        }
        if calls:
            message[TOOL_CALLS] = calls
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": text.finish_reason,
        }
    return {
        "index": index,
        "text": text.text,
        "logprobs": logprobs,
        "finish_reason": text.finish_reason,
    }


def completion_object(
    *,
    chat: bool,
    completion_id: str,
    model: str,
    created: int,
    texts: Sequence[GeneratedText],
    per_prompt: int,
) -> dict[str, Any]:
    """A `chat.completion` or `text_completion` holding every text as a choice."""
    ordered = sorted(texts, key=lambda t: (t.prompt_index, t.sequence_index))
    return {
        "id": completion_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [
            _choice(chat, choice_index(t.prompt_index, t.sequence_index, per_prompt), t)
            for t in ordered
        ],
        "usage": usage(ordered),
        "system_fingerprint": None,
    }


def chunk_object(
    *,
    chat: bool,
    completion_id: str,
    model: str,
    created: int,
    index: int,
    text: str | None = None,
    role: bool = False,
    finish_reason: str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    text_offset: int = 0,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One streamed chunk of one choice: its role (chat, first), text (with the log
    probability entries of the tokens it completes, where asked), tool call deltas (chat,
    each with its `index`), or finish reason."""
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text is not None:
            delta["content"] = text
        if tool_calls is not None:
            delta[TOOL_CALLS] = tool_calls
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": choice_logprobs(chat, logprobs),
            "finish_reason": finish_reason,
        }
    else:
        choice = {
            "index": index,
            "text": text or "",
            "logprobs": choice_logprobs(chat, logprobs, text_offset),
            "finish_reason": finish_reason,
        }
    return {
        "id": completion_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "system_fingerprint": None,
    }


def usage_chunk(
    *, chat: bool, completion_id: str, model: str, created: int, texts: Iterable[GeneratedText]
) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(texts),
        "system_fingerprint": None,
    }
