"""OpenAI Batch API input files: what a request line must hold to be accepted.

A batch input file is JSON Lines, one request per line:
`{"custom_id": "...", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
"body": {"model": ..., "prompt": ... | "messages": [...], "max_tokens", ...}}`.

`BatchRequestChecker` validates a file line by line at upload (core.datasets calls it
for files whose rows look like requests), so a broken file is refused with the line
that breaks it. It checks what the OpenAI format itself requires (types, ranges as
OpenAI documents them, one endpoint per file, unique custom_ids). Values that are
well-formed but that this server cannot run (more choices than a job allows, say) are
found when the line is converted to a GenerateSpec, and become that line's error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.enums import BatchEndpoint
from core.errors import DatasetFormatError
from core.json_types import json_type

REQUEST_KEYS = ("custom_id", "method", "url", "body")
MAX_BATCH_LINES = 50_000
MAX_CUSTOM_ID_CHARS = 512
MAX_MODEL_CHARS = 255
REQUEST_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

SUPPORTED_BODY_KEYS = frozenset(
    {
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "top_k",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "response_format",
        "logprobs",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)
"""Body fields that change what is generated here (top_k and repetition_penalty as in vLLM)."""

IGNORED_BODY_KEYS = frozenset({"user", "metadata", "store"})
"""Body fields accepted and ignored: they do not change the output."""

NEUTRAL_BODY_VALUES: dict[str, Any] = {
    "stream": False,
    "echo": False,
}
"""Fields this server does not implement, accepted only with their no-op value (or null)."""

Warn = Callable[[int, str, str], None]  # (line, kind, message)


@dataclass(frozen=True)
class _Range:
    low: float | None = None
    high: float | None = None
    integer: bool = False


PARAM_RANGES: dict[str, _Range] = {
    "max_tokens": _Range(low=1, integer=True),
    "max_completion_tokens": _Range(low=1, integer=True),
    "temperature": _Range(low=0, high=2),
    "top_p": _Range(low=0, high=1),
    "n": _Range(low=1, high=128, integer=True),
    "seed": _Range(integer=True),
    "top_k": _Range(low=-1, integer=True),
    "repetition_penalty": _Range(low=0),
    "frequency_penalty": _Range(low=-2, high=2),
    "presence_penalty": _Range(low=-2, high=2),
}

LOGIT_BIAS = _Range(low=-100, high=100)
CHAT_TOP_LOGPROBS = _Range(low=0, high=20, integer=True)
COMPLETION_LOGPROBS = _Range(low=0, high=5, integer=True)  # the legacy endpoint's logprobs: N


def looks_like_batch_request(keys: set[str]) -> bool:
    """A JSON object that is meant as a batch request line (even a broken one)."""
    return "custom_id" in keys or {"method", "url", "body"} <= keys


def _text(
    value: Any, what: str, line: int, *, max_chars: int | None = None, blank_ok: bool = False
) -> str:
    if not isinstance(value, str):
        raise DatasetFormatError(line, f"{what} must be a string, got {json_type(value)}")
    if not (value if blank_ok else value.strip()):
        raise DatasetFormatError(line, f"{what} is empty")
    if "\x00" in value:
        raise DatasetFormatError(line, f"{what} contains a NUL character")
    if max_chars is not None and len(value) > max_chars:
        raise DatasetFormatError(line, f"{what} is longer than {max_chars} characters")
    return value


def _check_number(name: str, value: Any, rule: _Range, line: int) -> None:
    what = f"body.{name}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DatasetFormatError(line, f"{what} must be a number, got {json_type(value)}")
    if not math.isfinite(value):
        raise DatasetFormatError(line, f"{what} must be a finite number")
    if rule.integer and not isinstance(value, int):
        raise DatasetFormatError(line, f"{what} must be an integer, got {value!r}")
    if rule.low is not None and value < rule.low:
        raise DatasetFormatError(line, f"{what} is {value!r}; it must be at least {rule.low:g}")
    if rule.high is not None and value > rule.high:
        raise DatasetFormatError(line, f"{what} is {value!r}; it must be at most {rule.high:g}")


def _check_stop(value: Any, line: int) -> None:
    if isinstance(value, str):
        _text(value, "body.stop", line, blank_ok=True)
        return
    if not isinstance(value, list):
        raise DatasetFormatError(
            line, f"body.stop must be a string or an array of strings, got {json_type(value)}"
        )
    for i, item in enumerate(value):
        _text(item, f"body.stop[{i}]", line, blank_ok=True)


def _check_logit_bias(value: Any, line: int) -> None:
    if not isinstance(value, dict):
        raise DatasetFormatError(line, f"body.logit_bias must be an object, got {json_type(value)}")
    for token, bias in value.items():
        if not token.isdigit():
            raise DatasetFormatError(line, f"body.logit_bias key {token!r} is not a token id")
        _check_number(f"logit_bias[{token!r}]", bias, LOGIT_BIAS, line)


def _check_logprobs(body: dict[str, Any], endpoint: BatchEndpoint, line: int) -> None:
    """Chat takes `logprobs: true` and `top_logprobs` 0..20; completions `logprobs: N`."""
    logprobs = body.get("logprobs")
    if endpoint is BatchEndpoint.COMPLETIONS:
        if logprobs is not None:
            _check_number("logprobs", logprobs, COMPLETION_LOGPROBS, line)
        if body.get("top_logprobs") is not None:
            raise DatasetFormatError(
                line, "body.top_logprobs is a chat parameter; completions take logprobs: N"
            )
        return
    if logprobs is not None and not isinstance(logprobs, bool):
        raise DatasetFormatError(
            line, f"body.logprobs must be a boolean, got {json_type(logprobs)}"
        )
    top = body.get("top_logprobs")
    if top is not None:
        _check_number("top_logprobs", top, CHAT_TOP_LOGPROBS, line)
        if top > 0 and not logprobs:
            raise DatasetFormatError(line, "body.top_logprobs needs body.logprobs: true")


def _check_messages(value: Any, line: int) -> None:
    if not isinstance(value, list):
        raise DatasetFormatError(line, f"body.messages must be an array, got {json_type(value)}")
    if not value:
        raise DatasetFormatError(line, "body.messages is empty")
    for i, message in enumerate(value):
        what = f"body.messages[{i}]"
        if not isinstance(message, dict):
            raise DatasetFormatError(line, f"{what} must be an object, got {json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise DatasetFormatError(line, f"{what} has no '{key}'")
        role = message["role"]
        if role not in REQUEST_ROLES:
            raise DatasetFormatError(
                line,
                f"{what}.role is {role!r}; expected one of {', '.join(sorted(REQUEST_ROLES))}",
            )
        calls = message.get("tool_calls")
        if calls is not None and not (role == "assistant" and isinstance(calls, list)):
            raise DatasetFormatError(line, f"{what}.tool_calls: an assistant message's array")
        only_calls = message["content"] is None and calls  # an assistant message's calls
        if not only_calls and not isinstance(message["content"], str):
            raise DatasetFormatError(
                line, f"{what}.content must be a string, got {json_type(message['content'])}"
            )
        name = message.get("name")
        if name is not None and not (isinstance(name, str) and len(name) <= 64):
            raise DatasetFormatError(line, f"{what}.name must be a string of at most 64 characters")


class BatchRequestChecker:
    """Validates the request lines of one file in order; remembers ids, endpoint and models."""

    def __init__(self, warn: Warn) -> None:
        self._warn = warn
        self._ids: dict[str, int] = {}
        self._endpoint: tuple[BatchEndpoint, int] | None = None
        self._models: set[str] = set()
        self._warned: set[str] = set()

    def _warn_once(self, line: int, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self._warn(line, kind, message)

    def check(self, obj: dict[str, Any], line: int) -> dict[str, Any]:
        """The line's request (only the four request keys), or DatasetFormatError."""
        if len(self._ids) >= MAX_BATCH_LINES:
            raise DatasetFormatError(line, f"a batch holds at most {MAX_BATCH_LINES} requests")
        missing = [k for k in REQUEST_KEYS if k not in obj]
        if missing:
            raise DatasetFormatError(
                line,
                f"missing key {', '.join(missing)}; a batch request line has "
                "custom_id, method, url and body",
            )
        extra = sorted(set(obj) - set(REQUEST_KEYS))
        if extra:
            self._warn_once(
                line, "ignored_keys", "keys outside a request are ignored: " + ", ".join(extra[:10])
            )
        custom_id = _text(obj["custom_id"], "custom_id", line, max_chars=MAX_CUSTOM_ID_CHARS)
        if custom_id in self._ids:
            raise DatasetFormatError(
                line, f"custom_id {custom_id!r} is already used on line {self._ids[custom_id]}"
            )
        if obj["method"] != "POST":
            raise DatasetFormatError(line, f"method is {obj['method']!r}; batch requests use POST")
        endpoint = self._check_url(obj["url"], line)
        body = obj["body"]
        if not isinstance(body, dict):
            raise DatasetFormatError(line, f"body must be an object, got {json_type(body)}")
        self._check_body(body, endpoint, line)
        self._ids[custom_id] = line
        return {"custom_id": custom_id, "method": "POST", "url": endpoint.value, "body": body}

    def _check_url(self, url: Any, line: int) -> BatchEndpoint:
        try:
            endpoint = BatchEndpoint(url)
        except ValueError:
            allowed = " or ".join(e.value for e in BatchEndpoint)
            raise DatasetFormatError(line, f"url is {url!r}; expected {allowed}") from None
        if self._endpoint is None:
            self._endpoint = (endpoint, line)
        elif self._endpoint[0] is not endpoint:
            first, first_line = self._endpoint
            raise DatasetFormatError(
                line,
                f"url is {endpoint.value} but line {first_line} uses {first.value}; "
                "every line of a batch calls the same endpoint",
            )
        return endpoint

    def _check_body(self, body: dict[str, Any], endpoint: BatchEndpoint, line: int) -> None:
        if "model" not in body:
            raise DatasetFormatError(line, "body.model is missing")
        self._models.add(_text(body["model"], "body.model", line, max_chars=MAX_MODEL_CHARS))
        if endpoint is BatchEndpoint.COMPLETIONS:
            if "prompt" not in body:
                hint = " (messages belong to /v1/chat/completions)" if "messages" in body else ""
                raise DatasetFormatError(line, f"body.prompt is missing{hint}")
            _text(body["prompt"], "body.prompt", line)
        else:
            if "messages" not in body:
                hint = " (prompt belongs to /v1/completions)" if "prompt" in body else ""
                raise DatasetFormatError(line, f"body.messages is missing{hint}")
            _check_messages(body["messages"], line)
        for name, rule in PARAM_RANGES.items():
            if body.get(name) is not None:
                _check_number(name, body[name], rule, line)
        if body.get("stop") is not None:
            _check_stop(body["stop"], line)
        if body.get("logit_bias") is not None:
            _check_logit_bias(body["logit_bias"], line)
        _check_logprobs(body, endpoint, line)
        if body.get("stream") is True:
            raise DatasetFormatError(line, "body.stream is true; batch requests do not stream")
        if body.get("tools") is not None and not isinstance(body["tools"], list):
            raise DatasetFormatError(
                line, f"body.tools must be an array, got {json_type(body['tools'])}"
            )

        unsupported = sorted(
            k
            for k, v in body.items()
            if k not in SUPPORTED_BODY_KEYS | IGNORED_BODY_KEYS
            and v is not None
            and (k not in NEUTRAL_BODY_VALUES or v != NEUTRAL_BODY_VALUES[k])
        )
        if unsupported:
            self._warn_once(
                line,
                "unsupported_parameters",
                "body fields this server does not support: "
                + ", ".join(unsupported[:10])
                + "; lines that set them will fail",
            )

    def summary(self) -> dict[str, Any]:
        """What a job needs to know about the file without reading it: endpoint and models."""
        return {
            "endpoint": self._endpoint[0].value if self._endpoint else None,
            "models": sorted(self._models),
            "requests": len(self._ids),
        }
