"""OpenAI's function tools on chat completions: the definitions a request gives, the call
it forces (`tool_choice` `required`, or one named function), the JSON Schema the workers
enforce while decoding that call, and the calls read back from the decoded text.

A forced call is decoded under a grammar (as a `response_format` is), so it always parses
and its arguments validate against the function's `parameters`:

- a named function (`{"type": "function", "function": {"name": ...}}`): the text is its
  arguments, one JSON object;
- `required`: the text is a JSON array of calls, `[{"name": ..., "arguments": {...}}]`,
  one or more (one when `parallel_tool_calls` is false), each naming one of the tools.

`tool_choice: "none"` shows the tools to the model and answers in text. With `auto` (the
model decides whether to call) nothing constrains decoding; the model's own call format is
read from its text instead. One format is read: Hermes' (`<tool_call>{"name": ...,
"arguments": {...}}</tool_call>`, written by Qwen2.5 and 3, SmolLM3, Hermes and the
models tuned from them), and `auto` is taken only for a model whose chat template shows
that format; for any other it is refused by name (send required or a named function).

Pure Python, like core/response_format.py: the grammar library stays in the workers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    field_validator,
)

from core.response_format import check_schema

MAX_TOOLS = 128  # OpenAI's limit
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
"""What a function without `parameters` takes: nothing (OpenAI's reading)."""

TOOL_CALLS = "tool_calls"  # an answer's calls, in a generated text's `data`

FunctionName = Annotated[str, StringConstraints(pattern=FUNCTION_NAME_PATTERN)]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName
    description: Annotated[str, StringConstraints(max_length=8_000)] | None = Field(
        default=None, exclude_if=lambda value: value is None
    )
    parameters: dict[str, Any] | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="A JSON Schema of the arguments object (the subset response_format "
        "takes); none: the function takes no arguments.",
    )
    strict: bool | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="Accepted either way: a forced call's arguments always follow the schema.",
    )

    @field_validator("parameters")
    @classmethod
    def _enforceable(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        if parameters is not None:
            check_schema(parameters, field="parameters")
        return parameters

    @property
    def arguments_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else NO_PARAMETERS


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class ToolName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: ToolName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.S)


def writes_calls(template: str | None) -> bool:
    """A chat template that shows the model tools and the Hermes call format (`auto`)."""
    return bool(template) and "tools" in str(template) and CALL_OPEN in str(template)


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName
    arguments: Annotated[str, StringConstraints(max_length=32_000)] = Field(
        description="The arguments as JSON text: one object."
    )

    @field_validator("arguments")
    @classmethod
    def _an_object(cls, arguments: str) -> str:
        try:
            parsed = json.loads(arguments)
        except ValueError:
            raise ValueError("arguments must be JSON text") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object")
        return arguments


class ToolCall(BaseModel):
    """A call an earlier assistant message made, given back in a conversation."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    type: Literal["function"]
    function: CalledFunction


TOOL_LIST: TypeAdapter[list[Tool]] = TypeAdapter(list[Tool])
TOOL_CALL_LIST: TypeAdapter[list[ToolCall]] = TypeAdapter(list[ToolCall])
TOOL_CHOICE: TypeAdapter[ToolChoice] = TypeAdapter(ToolChoice)


def forced_function(tools: Sequence[Tool], choice: ToolChoice | None) -> Tool | None:
    """The one tool a named tool_choice calls; None for any other choice."""
    if not isinstance(choice, NamedToolChoice):
        return None
    return next((t for t in tools if t.function.name == choice.function.name), None)


def call_schema(
    tools: Sequence[Tool], choice: ToolChoice | None, parallel: bool
) -> dict[str, Any] | None:
    """The JSON Schema a forced call's text follows; None when no call is forced."""
    named = forced_function(tools, choice)
    if named is not None:
        return named.function.arguments_schema
    if choice != "required":
        return None
    defs: dict[str, Any] = {}
    branches = []
    for index, tool in enumerate(tools):
        arguments = _hoisted(tool.function.arguments_schema, f"tool{index}", defs)
        branches.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.function.name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": branches}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _hoisted(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters placed inside another schema: its definitions moved to the
    root's `$defs` under `prefix`, and its references (to them, or to its own root) pointed
    there, so that they resolve from the new root."""
    root_ref = f"#/$defs/{prefix}"
    own = {
        f"#/{group}/{name}": f"#/$defs/{prefix}_{name}"
        for group in ("$defs", "definitions")
        if isinstance(schema.get(group), dict)
        for name in schema[group]
    }
    refers_to_root = False

    def moved(node: Any) -> Any:
        nonlocal refers_to_root
        if isinstance(node, list):
            return [moved(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                refers_to_root |= value == "#"
                out[key] = root_ref if value == "#" else own.get(value, value)
            elif key in ("$defs", "definitions") and node is schema:
                continue
            else:
                out[key] = moved(value)
        return out

    body: dict[str, Any] = moved(schema)
    for group in ("$defs", "definitions"):
        for name, sub in (schema.get(group) or {}).items():
            defs[f"{prefix}_{name}"] = moved(sub)
    if refers_to_root:
        defs[prefix] = body
        return {"$ref": root_ref}
    return body


def call_id(completion_id: str, choice: int, call: int) -> str:
    """A call's id: the same each time the answer is read (a retry with the same
    Idempotency-Key gets the same ids)."""
    digest = hashlib.sha256(f"{completion_id}:{choice}:{call}".encode()).hexdigest()
    return f"call_{digest[:24]}"


def called(
    text: str, tools: Sequence[Tool], choice: ToolChoice | None, completion_id: str, index: int
) -> list[dict[str, Any]] | None:
    """The tool calls (OpenAI's `tool_calls`) a forced call's decoded text makes; None when
    it cannot be read as calls (decoding stopped early, at max_tokens or a stop string)."""
    named = forced_function(tools, choice)
    pairs: list[tuple[str, str]]
    if named is not None:
        pairs = [(named.function.name, text)]
    else:
        try:
            parsed = json.loads(text)
        except ValueError:
            return None
        if not isinstance(parsed, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in parsed
        ):
            return None
        pairs = [(c["name"], json.dumps(c.get("arguments"), ensure_ascii=False)) for c in parsed]
    return [_call(completion_id, index, k, name, args) for k, (name, args) in enumerate(pairs)]


def _call(completion_id: str, index: int, k: int, name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": call_id(completion_id, index, k),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


@dataclass(frozen=True)
class Answered:
    """A choice that made tool calls: its text before them (None when it has none), the
    calls (OpenAI's `tool_calls`) and its finish reason."""

    content: str | None
    calls: list[dict[str, Any]]
    finish_reason: str


def answered_calls(
    text: str,
    finish_reason: str,
    tools: Sequence[Tool],
    choice: ToolChoice | None,
    completion_id: str,
    index: int,
) -> Answered | None:
    """A finished text as the calls OpenAI answers (for the live routes and batch lines
    alike); None when it made none (it is answered as text).

    - a named function's call is its text, cut short or not (`stop`, or the reason it was
      cut, such as `length`);
    - `required`'s calls, when their text is whole (`tool_calls`);
    - `auto`'s, when the model wrote whole calls in the Hermes format naming the tools:
      its text before them is the content (`tool_calls` if it stopped)."""
    if choice is None or choice == "none":
        return None
    if choice == "auto":
        return _hermes_answer(text, finish_reason, tools, completion_id, index)
    if forced_function(tools, choice) is not None:
        calls = called(text, tools, choice, completion_id, index) or []
        return Answered(None, calls, finish_reason)
    made = called(text, tools, choice, completion_id, index) if finish_reason == "stop" else None
    return None if made is None else Answered(None, made, "tool_calls")


def _hermes_answer(
    text: str, finish_reason: str, tools: Sequence[Tool], completion_id: str, index: int
) -> Answered | None:
    start = text.find(CALL_OPEN)
    if start < 0:
        return None
    names = {t.function.name for t in tools}
    pairs = []
    for block in _CALL_BLOCK.finditer(text, start):
        try:
            call = json.loads(block.group(1))
        except ValueError:
            continue
        if not isinstance(call, dict) or call.get("name") not in names:
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except ValueError:
                continue
        if isinstance(arguments, dict):
            pairs.append((call["name"], json.dumps(arguments, ensure_ascii=False)))
    if not pairs:
        return None
    calls = [_call(completion_id, index, k, name, args) for k, (name, args) in enumerate(pairs)]
    finish = "tool_calls" if finish_reason == "stop" else finish_reason
    return Answered(text[:start].strip() or None, calls, finish)


RecordT = TypeVar("RecordT")


def answered_record(record: RecordT, answer: Answered) -> RecordT:
    """A generated text (a dataclass with `text`, `finish_reason` and `data`, such as an
    outputs row) answered as calls: its text the content before them, the calls in its
    `data`."""
    data = getattr(record, "data", None) or {}
    changed: RecordT = replace(
        cast("Any", record),
        text=answer.content or "",
        finish_reason=answer.finish_reason,
        data={**data, TOOL_CALLS: answer.calls},
    )
    return changed


def sendable_content(text: str) -> int:
    """How much of an `auto` answer's text so far may be streamed as content: up to its
    first call, and short of an end that may be the start of one (held until it is not)."""
    start = text.find(CALL_OPEN)
    if start >= 0:
        return start
    for held in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-held:]):
            return len(text) - held
    return len(text)


def template_conversation(
    conversation: Sequence[Mapping[str, Any]], tools: Sequence[Tool] | None, template: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A conversation (GenerateSpec messages, dumped) and its tools as a chat template
    takes them (`apply_chat_template(messages, tools=...)`): calls with their arguments as
    objects, as transformers' templates expect. A template that does not render tools gets
    them in the system message; one that does not render calls, an assistant's calls as
    the JSON text a `required` call is decoded as."""
    shows_tools = "tools" in template
    shows_calls = "tool_calls" in template
    messages: list[dict[str, Any]] = []
    for message in conversation:
        out = dict(message)
        calls = [
            {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
            for c in out.pop(TOOL_CALLS, None) or []
        ]
        if calls and shows_calls:
            out[TOOL_CALLS] = [
                {"id": c["id"], "type": "function", "function": call}
                for c, call in zip(message[TOOL_CALLS], calls, strict=True)
            ]
        elif calls:
            text = json.dumps(calls, ensure_ascii=False)
            out["content"] = f"{out['content']}\n{text}" if out.get("content") else text
        messages.append(out)
    if not tools:
        return messages, None
    definitions = [tool.model_dump() for tool in tools]
    if shows_tools:
        return messages, definitions
    listing = "You can call these functions (JSON Schema of each one's arguments):\n" + "\n".join(
        json.dumps(d["function"], ensure_ascii=False) for d in definitions
    )
    if messages and messages[0].get("role") == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{listing}"}
    else:
        messages.insert(0, {"role": "system", "content": listing})
    return messages, None
