"""Batch request lines in, OpenAI output and error lines out (pure functions, no I/O).

An output line: `{"id": "batch_req_<hex>", "custom_id", "response": {"status_code": 200,
"request_id", "body": <a text_completion or chat.completion object>}, "error": null}`;
an error line: `{"id", "custom_id", "response": null, "error": {"code", "message"}}`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from core.batch import IGNORED_BODY_KEYS, NEUTRAL_BODY_VALUES, SUPPORTED_BODY_KEYS
from core.completions import (
    choice_index,
    completion_object,
    sampling_fields,
    spec_message,
    tool_fields,
)
from core.enums import BatchEndpoint, FailureType
from core.errors import BatchLineError
from core.specs import GenerateSpec
from core.tools import TOOL_CHOICE, TOOL_LIST, answered_calls, answered_record
from db.batch import ERROR_FINISH_REASON
from db.outputs import OutputRecord, storable_text

EXPIRED_CODE = FailureType.BATCH_EXPIRED.value
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

_SPEC_NAMES = {
    "max_new_tokens": "max_tokens",
    "num_return_sequences": "n",
    "prompts": "prompt",
    "messages": "messages",
}


def _unsupported(body: dict[str, Any]) -> list[str]:
    return sorted(
        key
        for key, value in body.items()
        if key not in SUPPORTED_BODY_KEYS | IGNORED_BODY_KEYS
        and value is not None
        and (key not in NEUTRAL_BODY_VALUES or value != NEUTRAL_BODY_VALUES[key])
    )


def _where(loc: tuple[int | str, ...]) -> str:
    """A GenerateSpec error location as the request body's field, e.g. body.messages[1].role."""
    head, rest = str(loc[0]), loc[1:]
    if head in ("prompts", "messages"):
        rest = rest[1:]  # one prompt (or conversation) per line
    name = _SPEC_NAMES.get(head, head)
    return "body." + name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        message = str(err.get("msg", "")).removeprefix("Value error, ")
        loc = tuple(err.get("loc", ()))
        parts.append(f"{_where(loc)}: {message}" if loc else message)
    return "; ".join(parts)


def generate_spec_for(request: dict[str, Any], chat_default_max_tokens: int) -> GenerateSpec:
    """The GenerateSpec that runs one request line; BatchLineError if it cannot run here. A
    chat line that sets no max tokens gets what `/v1/chat/completions` gives such a request:
    up to `chat_default_max_tokens`, or what the model's context leaves after the prompt."""
    body: dict[str, Any] = request["body"]
    unsupported = _unsupported(body)
    if unsupported:
        raise BatchLineError(f"unsupported parameter: {', '.join(unsupported)}")
    chat = BatchEndpoint(request["url"]) is BatchEndpoint.CHAT_COMPLETIONS
    fields: dict[str, Any] = {"model": body["model"]}
    if chat:
        fields["messages"] = [
            [
                spec_message(
                    m["role"],
                    m["content"] or "",  # null: an assistant message that only called tools
                    m.get("name"),
                    tool_calls=m.get("tool_calls"),
                    tool_call_id=m.get("tool_call_id"),
                )
                for m in body["messages"]
            ]
        ]
    else:
        fields["prompts"] = [body["prompt"]]
    max_tokens = body.get("max_completion_tokens") if chat else None
    max_tokens = max_tokens if max_tokens is not None else body.get("max_tokens")
    if max_tokens is not None:
        fields["max_new_tokens"] = max_tokens
    elif chat:
        fields["max_new_tokens"] = chat_default_max_tokens
        fields["fit_max_new_tokens"] = True
    else:
        fields["max_new_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS
    fields.update(sampling_fields(body.get))
    if body.get("response_format") is not None:
        fields["response_format"] = body["response_format"]
    if chat:
        fields.update(
            tool_fields(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
        )
    if chat:
        if body.get("logprobs") is not None:
            fields["logprobs"] = body["logprobs"]
        if body.get("top_logprobs") is not None:
            fields["top_logprobs"] = body["top_logprobs"]
    else:
        if body.get("top_logprobs") is not None:
            raise BatchLineError("unsupported parameter: top_logprobs (use logprobs: N)")
        logprobs = body.get("logprobs")
        if logprobs is not None:
            if isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs > 5:
                raise BatchLineError("body.logprobs: an integer from 0 to 5")
            fields["logprobs"] = True
            fields["top_logprobs"] = logprobs
    stop = body.get("stop")
    if stop is not None:
        fields["stop"] = [stop] if isinstance(stop, str) else stop
    try:
        return GenerateSpec.model_validate(fields)
    except ValidationError as exc:
        raise BatchLineError(_validation_message(exc)) from None


def _with_calls(
    body: dict[str, Any], texts: list[OutputRecord], completion_id: str
) -> list[OutputRecord]:
    """A forced call's texts as the calls they make (`data.tool_calls`), as the live route
    answers them."""
    if not body.get("tools"):
        return texts
    tools = TOOL_LIST.validate_python(body["tools"])  # the line ran: they are valid
    given = tool_fields(body["tools"], body.get("tool_choice"), None)
    choice = TOOL_CHOICE.validate_python(given["tool_choice"])
    out = []
    for t in texts:
        index = choice_index(t.prompt_index, t.sequence_index, len(texts))
        answer = answered_calls(t.text, t.finish_reason, tools, choice, completion_id, index)
        out.append(t if answer is None else answered_record(t, answer))
    return out


def _hex() -> str:
    return uuid.uuid4().hex


def output_line(
    request: dict[str, Any], texts: Sequence[OutputRecord], created: int | None = None
) -> dict[str, Any]:
    """The output line of a request whose texts are all generated (one per choice), with
    the same character swap as stored texts (a NUL a model emitted reads U+FFFD in both)."""
    chat = BatchEndpoint(request["url"]) is BatchEndpoint.CHAT_COMPLETIONS
    texts = [replace(t, text=storable_text(t.text)) for t in texts]
    completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{_hex()}"
    if chat:
        texts = _with_calls(request["body"], texts, completion_id)
    body = completion_object(
        chat=chat,
        completion_id=completion_id,
        model=request["body"]["model"],
        created=int(time.time()) if created is None else created,
        texts=texts,
        per_prompt=max(len(texts), 1),
    )
    return {
        "id": f"batch_req_{_hex()}",
        "custom_id": request["custom_id"],
        "response": {"status_code": 200, "request_id": _hex(), "body": body},
        "error": None,
    }


def error_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{_hex()}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def stored_output(
    index: int, request: dict[str, Any], texts: Sequence[OutputRecord]
) -> OutputRecord:
    """The outputs-table row of a finished line: its first choice's text, the line in `data`."""
    line = output_line(request, texts)
    first = min(texts, key=lambda t: t.sequence_index)
    return OutputRecord(
        prompt_index=index,
        sequence_index=0,
        text=first.text,
        finish_reason=first.finish_reason,
        prompt_tokens=first.prompt_tokens,
        completion_tokens=line["response"]["body"]["usage"]["completion_tokens"],
        data=line,
    )


def stored_error(index: int, custom_id: str, code: str, message: str) -> OutputRecord:
    """The outputs-table row of a failed line: no text, the error line in `data`."""
    return OutputRecord(
        prompt_index=index,
        sequence_index=0,
        text="",
        finish_reason=ERROR_FINISH_REASON,
        prompt_tokens=0,
        completion_tokens=0,
        data=error_line(custom_id, code, message),
    )
