"""OpenAI chat and completion request bodies, as generation job requests.

`POST /v1/chat/completions` and `POST /v1/completions` take OpenAI's bodies. Every field
is either honoured (mapped onto a GenerateSpec or the job), accepted because it changes
nothing here (`user`, `metadata`), accepted only with its no-op value
(`best_of: 1`, ...), or refused with a 400 that names it: a client is
never answered as if a parameter it set had been applied. Function tools: core/tools.py.

Log probabilities are honoured: chat's `logprobs: true` with `top_logprobs` 0..20, the
legacy completions' `logprobs: N` (0..5: the chosen token and the N most likely). They are
the model's own distribution, before temperature, top-p/k, penalties or a response format
change it (GenerateSpec.logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from fastapi import Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
)

from core.completions import sampling_fields, spec_message, tool_fields
from core.errors import BadRequestError, MalformedBodyError, UnsupportedParameterError
from core.json_types import json_path
from core.specs import MAX_TOP_LOGPROBS, MODEL_REF_PATTERN, GenerateJobRequest

BodyT = TypeVar("BodyT", bound=BaseModel)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions' logprobs
MAX_METADATA_KEYS = 16

_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "functions": ([],),
    "best_of": (1,),
    "suffix": ("",),
    "modalities": (["text"],),
    "service_tier": ("auto", "default"),
    "top_logprobs": (0,),
}
"""Parameters not implemented here, accepted only with a value that asks for nothing."""

_WHY_NOT: dict[str, str] = {
    "functions": "functions are deprecated; use tools",
    "function_call": "function_call is deprecated; use tool_choice",
    "best_of": "best_of is not supported; use n",
    "suffix": "suffixes (fill in the middle) are not supported",
    "modalities": "only text is generated",
    "service_tier": "there is one service tier",
    "top_logprobs": "/v1/completions takes logprobs: N for the N most likely tokens",
}

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: Annotated[str, StringConstraints(max_length=32_000)]


class RequestMessage(BaseModel):
    """A chat message; `content` may be text parts (joined), never images or audio. An
    assistant message that made tool calls may have no content; a tool message answers
    one call (`tool_call_id`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Role
    content: Annotated[str, StringConstraints(max_length=32_000)] | list[TextPart] | None
    name: Annotated[str, StringConstraints(max_length=64)] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # checked as the spec's (core.tools)
    tool_call_id: str | None = None
    refusal: str | None = None  # an assistant message given back as the SDK returned it

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None


Stop = (
    Annotated[str, StringConstraints(max_length=200)]
    | list[Annotated[str, StringConstraints(max_length=200)]]
)


class _SamplingBody(BaseModel):
    """What both endpoints take. Fields this server does not implement are declared loosely
    (`Any`) so that their use is refused by name, not as a type error. Strict, as OpenAI
    checks JSON types: `"stream": "yes"` or `"n": "2"` is a 400, not coerced."""

    model_config = ConfigDict(extra="allow", strict=True)
    honoured: ClassVar[frozenset[str]] = frozenset()  # _WHY_NOT names this body implements

    model: Annotated[str, StringConstraints(pattern=MODEL_REF_PATTERN)]
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=16)
    stop: Stop | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Annotated[str, StringConstraints(max_length=512)] | None = None
    metadata: (
        dict[
            Annotated[str, StringConstraints(min_length=1, max_length=64)],
            Annotated[str, StringConstraints(max_length=512)],
        ]
        | None
    ) = None
    top_k: int | None = Field(default=None, ge=-1, le=1000, description="As in vLLM; -1 is off.")
    repetition_penalty: float | None = Field(default=None, ge=0.5, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        default=None,
        description="Token id (as a string) -> a bias from -100 to 100 added to that "
        "token's logit before sampling, as OpenAI's.",
    )
    store: bool | None = Field(
        default=None,
        description="Keep the generated text in the database (default: the server's "
        "SERVING_STORE_TEXT). false: the answer reaches the client only as it is decoded.",
    )
    service_tier: Any = None


class ChatCompletionBody(_SamplingBody):
    """`POST /v1/chat/completions`."""

    honoured: ClassVar[frozenset[str]] = frozenset({"top_logprobs"})
    messages: list[RequestMessage] = Field(min_length=1, max_length=1024)
    logprobs: StrictBool | None = Field(
        default=None, description="Return each output token's log probability."
    )
    top_logprobs: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: true, also this many most likely tokens at each place.",
    )
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = Field(
        default=None,
        description="OpenAI's text, json_object or json_schema, enforced while decoding.",
    )
    tools: list[Any] | None = Field(
        default=None,
        description="Function tools; a call is answered when tool_choice forces it "
        "(required, or a named function), decoded under the function's parameters.",
    )
    tool_choice: Any = Field(
        default=None,
        description="none, auto (the default with tools: for a model whose chat template "
        "shows Hermes' <tool_call> format), required or {type: function, function: {name}}.",
    )
    parallel_tool_calls: StrictBool | None = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None


class CompletionBody(_SamplingBody):
    """`POST /v1/completions`."""

    honoured: ClassVar[frozenset[str]] = frozenset({"echo"})
    max_tokens: int | None = Field(
        default=None, ge=0, description="0 (with echo) scores the prompt only."
    )

    prompt: (
        Annotated[str, StringConstraints(max_length=32_000)]
        | list[Annotated[str, StringConstraints(max_length=32_000)]]
        | list[int]
        | list[list[int]]
    ) = Field(
        description="A string, a list of strings, or token ids: one list of them, or a list "
        "of such lists (the model's own ids, fed as given)."
    )
    logprobs: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        description="Return each output token's log probability and this many most "
        "likely tokens at each place.",
    )
    echo: StrictBool | None = Field(
        default=None,
        description="Put the prompt before each completion; with logprobs, its tokens' "
        "log probabilities too (the first null). Not with stream, nor with store: false.",
    )
    suffix: Any = None
    best_of: Any = None
    top_logprobs: Any = None  # chat's; here logprobs: N asks for them


@dataclass(frozen=True)
class ServingRequest:
    """A parsed serving request: the job to create and how to answer."""

    chat: bool
    model: str
    job: GenerateJobRequest
    stream: bool
    include_usage: bool
    prompts: int
    choices_per_prompt: int
    echo: bool = False  # put each prompt before its completions (legacy completions)


def _validated(model: type[_SamplingBody], body: Any) -> _SamplingBody:
    kind = "chat completion" if model is ChatCompletionBody else "completion"
    return validated_body(model, body, kind)


def validated_body(model: type[BodyT], body: Any, kind: str) -> BodyT:
    """An OpenAI request body as `model`; refused as OpenAI does, with a 400 naming the first
    bad field (an unknown field of a model that forbids extras: unsupported_parameter)."""
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object", param="body")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = json_path(first["loc"]) or None
        if first["type"] == "extra_forbidden" and param is not None:
            raise UnsupportedParameterError(f"unknown parameter {param!r}", param=param) from None
        message = str(first["msg"]).removeprefix("Value error, ")
        raise BadRequestError(
            f"{param or 'body'}: {message} (in a {kind} request)", param=param
        ) from None


async def json_body(request: Request) -> Any:
    """The request's body as JSON, for a route that validates it itself."""
    try:
        return await request.json()
    except ValueError:
        raise MalformedBodyError("request body is not valid JSON") from None


def _refuse_unsupported(parsed: _SamplingBody) -> None:
    unknown = sorted(parsed.model_extra or {})
    if unknown:
        raise UnsupportedParameterError(f"unknown parameter {unknown[0]!r}", param=unknown[0])
    for name, why in _WHY_NOT.items():
        if name not in type(parsed).model_fields or name in parsed.honoured:
            continue
        value = getattr(parsed, name)
        if value is None or any(
            type(value) is type(neutral) and value == neutral for neutral in _NEUTRAL.get(name, ())
        ):
            continue
        raise UnsupportedParameterError(f"{name}: {why}", param=name)


def _metadata(parsed: _SamplingBody) -> dict[str, Any]:
    metadata: dict[str, Any] = dict(parsed.metadata or {})
    if len(metadata) > MAX_METADATA_KEYS:
        raise BadRequestError(f"metadata holds at most {MAX_METADATA_KEYS} keys", param="metadata")
    if parsed.user is not None:
        metadata.setdefault("user", parsed.user)
    return metadata


def _spec_fields(
    parsed: _SamplingBody, default_max_tokens: int, store_text: bool
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model": parsed.model,
        "max_new_tokens": default_max_tokens,
        "store_text": store_text if parsed.store is None else parsed.store,
        **sampling_fields(lambda name: getattr(parsed, name)),
    }
    if parsed.stop is not None:
        stops = [parsed.stop] if isinstance(parsed.stop, str) else parsed.stop
        if len(stops) > 4:
            raise BadRequestError("stop holds at most 4 sequences", param="stop")
        fields["stop"] = [s for s in stops if s]
    return fields


_SPEC_PARAMS = {
    "spec.max_new_tokens": "max_tokens",
    "spec.num_return_sequences": "n",
    "spec.temperature": "temperature",
    "spec.top_p": "top_p",
    "spec.top_k": "top_k",
    "spec.seed": "seed",
    "spec.stop": "stop",
    "spec.model": "model",
    "metadata": "metadata",
    "spec.frequency_penalty": "frequency_penalty",
    "spec.presence_penalty": "presence_penalty",
    "spec.response_format": "response_format",
    "spec.logprobs": "logprobs",
    "spec.top_logprobs": "top_logprobs",
    "spec.tools": "tools",
    "spec.tool_choice": "tool_choice",
    "spec.parallel_tool_calls": "parallel_tool_calls",
}


def openai_param(ours: str | None, chat: bool, max_tokens: str | None = None) -> str | None:
    """The OpenAI body field a job-request field path (spec.messages[0][1].content) came from;
    `max_tokens` names the chat field that set max_new_tokens, when the request set one."""
    if ours in (None, "spec"):
        return None
    if ours.startswith("spec.messages"):  # one conversation per request
        return "messages" + ours.removeprefix("spec.messages").removeprefix("[0]")
    if ours.startswith("spec.prompts"):
        return "prompt" + ours.removeprefix("spec.prompts")
    if ours.startswith("spec.prompt_token_ids"):
        return "prompt" + ours.removeprefix("spec.prompt_token_ids")
    if ours.startswith("spec.logit_bias"):  # a key or its value: the map is the field
        return "logit_bias"
    for prefix, theirs in _SPEC_PARAMS.items():
        if ours == prefix or ours.startswith(prefix + ".") or ours.startswith(prefix + "["):
            if theirs == "max_tokens" and chat:
                return max_tokens or "max_completion_tokens"
            # a union's tag (response_format's json_schema) is not a field of the body
            rest = ours.removeprefix(prefix).replace(".json_schema.json_schema", ".json_schema")
            return theirs + rest
    return ours


def _job_request(
    fields: dict[str, Any], metadata: dict[str, Any], chat: bool, max_tokens: str | None = None
) -> GenerateJobRequest:
    payload = {"kind": "generate", "spec": fields, "metadata": metadata}
    try:
        return GenerateJobRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        ours = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")
        param = openai_param(ours, chat, max_tokens)
        message = str(first["msg"]).removeprefix("Value error, ")
        for spec_name, theirs in (
            ("num_return_sequences", "n"),
            ("max_new_tokens", "max_tokens"),
            ("tool_choice", "tool_choice"),
            ("tools", "tools"),
            ("response_format", "response_format"),
        ):
            if param is None and spec_name in message:  # a rule across fields names this one
                param = theirs
            message = message.replace(spec_name, theirs)
        raise BadRequestError(f"{param or 'body'}: {message}", param=param) from None


def chat_request(body: Any, default_max_tokens: int, store_text: bool = True) -> ServingRequest:
    parsed = _validated(ChatCompletionBody, body)
    assert isinstance(parsed, ChatCompletionBody)
    _refuse_unsupported(parsed)
    fields = _spec_fields(parsed, default_max_tokens, store_text)
    if parsed.top_logprobs and not parsed.logprobs:
        raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    if parsed.logprobs:
        fields["logprobs"] = True
        fields["top_logprobs"] = parsed.top_logprobs or 0
    max_tokens = parsed.max_completion_tokens or parsed.max_tokens
    if max_tokens is not None:
        fields["max_new_tokens"] = max_tokens
    else:  # OpenAI's chat default: what the context leaves, here up to default_max_tokens
        fields["fit_max_new_tokens"] = True
    if parsed.response_format is not None:
        fields["response_format"] = parsed.response_format
    if not parsed.tools and parsed.tool_choice not in (None, "none"):
        raise BadRequestError("tool_choice needs tools", param="tool_choice")
    fields.update(tool_fields(parsed.tools, parsed.tool_choice, parsed.parallel_tool_calls))
    fields["messages"] = [[_spec_message(m, i) for i, m in enumerate(parsed.messages)]]
    given = "max_completion_tokens" if parsed.max_completion_tokens else "max_tokens"
    job = _job_request(fields, _metadata(parsed), chat=True, max_tokens=given)
    return _serving(parsed, job, chat=True)


def _spec_message(message: RequestMessage, index: int) -> dict[str, Any]:
    if message.content is None and not (message.role == "assistant" and message.tool_calls):
        raise BadRequestError(
            f"messages[{index}].content: only an assistant message with tool_calls may "
            "have no content",
            param=f"messages[{index}].content",
        )
    return spec_message(
        message.role,
        message.text,
        message.name,
        tool_calls=message.tool_calls,
        tool_call_id=message.tool_call_id,
    )


def completion_request(body: Any, store_text: bool = True) -> ServingRequest:
    parsed = _validated(CompletionBody, body)
    assert isinstance(parsed, CompletionBody)
    _refuse_unsupported(parsed)
    fields = _spec_fields(parsed, COMPLETIONS_DEFAULT_MAX_TOKENS, store_text)
    if parsed.logprobs is not None:
        fields["logprobs"] = True
        fields["top_logprobs"] = parsed.logprobs
    if parsed.max_tokens is not None:
        fields["max_new_tokens"] = parsed.max_tokens
    prompt = parsed.prompt
    if not prompt:
        raise BadRequestError("prompt is empty", param="prompt")
    if isinstance(prompt, str):
        fields["prompts"] = [prompt]
    elif all(isinstance(p, int) for p in prompt):
        fields["prompt_token_ids"] = [prompt]
    elif all(isinstance(p, list) for p in prompt):
        fields["prompt_token_ids"] = prompt
    else:
        fields["prompts"] = prompt
    if parsed.max_tokens == 0 and not parsed.echo:
        raise BadRequestError(
            "max_tokens 0 generates nothing: it needs echo: true (to score the prompt)",
            param="max_tokens",
        )
    if parsed.echo:
        if parsed.stream:
            raise BadRequestError("echo is not supported with stream: true", param="echo")
        if not fields["store_text"]:
            raise BadRequestError(
                "echo needs the answer stored (store: true): it is assembled from the "
                "stored outputs",
                param="echo",
            )
        if parsed.logprobs is not None or "prompt_token_ids" in fields or parsed.max_tokens == 0:
            # the prompt's entries: its log probabilities, the text of its token ids, or
            # all a request that generates nothing (max_tokens 0) gets from the worker
            fields["prompt_logprobs"] = parsed.logprobs or 0
    job = _job_request(fields, _metadata(parsed), chat=False)
    return replace(_serving(parsed, job, chat=False), echo=bool(parsed.echo))


def _serving(parsed: _SamplingBody, job: GenerateJobRequest, chat: bool) -> ServingRequest:
    if parsed.stream_options is not None and not parsed.stream:
        raise BadRequestError(
            "stream_options is only allowed with stream: true", param="stream_options"
        )
    include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
    return ServingRequest(
        chat=chat,
        model=parsed.model,
        job=job,
        stream=bool(parsed.stream),
        include_usage=include_usage,
        prompts=job.spec.prompt_count,
        choices_per_prompt=job.spec.num_return_sequences,
    )


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its definitions inlined, for the OpenAPI document of a
    route that reads its body itself."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


def request_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI `requestBody` (as a route's openapi_extra) of a route that reads and
    validates its body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": body_schema(model)}},
        }
    }
