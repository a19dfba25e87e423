"""Function tools (core/tools.py): the schema a forced call is decoded under, the calls read
back from its text, how a conversation with calls reaches a chat template, and how a chat
request's tools map onto a GenerateSpec (or are refused by name)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from api.serving_requests import chat_request
from core.completions import chunk_object, completion_object
from core.errors import BadRequestError
from core.prompts import PromptError, encode_prompts
from core.specs import GenerateSpec
from core.tools import (
    NO_PARAMETERS,
    TOOL_CALLS,
    Tool,
    answered_calls,
    call_id,
    call_schema,
    called,
    sendable_content,
    template_conversation,
    writes_calls,
)
from db.outputs import OutputRecord

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
# as openai.pydantic_function_tool writes a model with a nested one: $defs and $refs
ORDER = {
    "type": "function",
    "function": {
        "name": "place_order",
        "parameters": {
            "$defs": {
                "Item": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                }
            },
            "type": "object",
            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
            "required": ["items"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
QUESTION = [{"role": "user", "content": "Weather in Oslo?"}]


def tools(*defs: dict[str, Any]) -> list[Tool]:
    return [Tool.model_validate(d) for d in defs]


def spec(**fields: Any) -> GenerateSpec:
    return GenerateSpec.model_validate({"model": "m", "messages": [QUESTION], **fields})


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def test_a_named_call_is_decoded_as_its_arguments() -> None:
    forced = spec(tools=[WEATHER, TIME], tool_choice=named("get_weather"))
    assert forced.output_schema == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert call_schema(tools(WEATHER), "none", True) is None
    # a function without parameters takes none
    only_time = spec(tools=[TIME], tool_choice=named("get_time"))
    assert only_time.output_schema == NO_PARAMETERS


def test_required_is_an_array_of_calls_each_naming_a_tool() -> None:
    schema = spec(tools=[WEATHER, TIME], tool_choice="required").output_schema
    assert schema is not None
    good = [
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
        {"name": "get_time", "arguments": {}},
    ]
    jsonschema.validate(good, schema)
    for bad in (
        [],  # at least one call
        [{"name": "get_weather", "arguments": {}}],  # city is required
        [{"name": "get_time", "arguments": {"tz": "UTC"}}],  # takes no arguments
        [{"name": "send_mail", "arguments": {}}],  # not a tool
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = spec(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert one.output_schema is not None
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, one.output_schema)


def test_definitions_of_each_function_resolve_from_the_array_root() -> None:
    schema = spec(tools=[WEATHER, ORDER], tool_choice="required").output_schema
    assert schema is not None
    assert set(schema["$defs"]) == {"tool1_Item"}
    jsonschema.validate(
        [{"name": "place_order", "arguments": {"items": [{"sku": "a", "qty": 2}]}}], schema
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            [{"name": "place_order", "arguments": {"items": [{"sku": "a"}]}}], schema
        )
    # a function whose schema refers to its own root (a tree) is moved whole
    tree = {
        "type": "function",
        "function": {
            "name": "tree",
            "parameters": {
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#"}}},
            },
        },
    }
    schema = spec(tools=[TIME, tree], tool_choice="required").output_schema
    assert schema is not None
    jsonschema.validate([{"name": "tree", "arguments": {"children": [{"children": []}]}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "tree", "arguments": {"children": [1]}}], schema)


def test_calls_are_read_back_with_ids_that_stay_the_same() -> None:
    weather = tools(WEATHER, TIME)
    choice = spec(tools=[WEATHER, TIME], tool_choice=named("get_weather")).tool_choice
    [call] = called('{"city": "Oslo"}', weather, choice, "chatcmpl-1", 0) or []
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert call["id"] == call_id("chatcmpl-1", 0, 0) != call_id("chatcmpl-1", 1, 0)
    text = (
        '[{"name": "get_time", "arguments": {}}, '
        '{"name": "get_weather", "arguments": {"city": "Bergen"}}]'
    )
    calls = called(text, weather, "required", "chatcmpl-1", 0)
    assert calls is not None
    assert [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Bergen"}
    assert len({c["id"] for c in calls}) == 2
    assert called('[{"name": "get_time", "argu', weather, "required", "c", 0) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tools": [WEATHER]}, "need a tool_choice"),
        ({"tool_choice": "required"}, "need tools"),
        ({"tools": [WEATHER], "tool_choice": named("get_time")}, "not one of the tools"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "same name"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "cannot both",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}
                ],
                "tool_choice": "required",
            },
            "parameters: 'not' is not supported",
        ),
    ],
)
def test_specs_that_cannot_be_served_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


def test_tools_need_a_chat_template() -> None:
    with pytest.raises(ValidationError, match="need messages"):
        GenerateSpec.model_validate(
            {"model": "m", "prompts": ["p"], "tools": [WEATHER], "tool_choice": "none"}
        )


def test_a_spec_without_tools_dumps_as_before() -> None:
    dumped = spec().model_dump(mode="json")
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(dumped)
    assert set(dumped["messages"][0][0]) == {"role", "content"}


CALL: dict[str, Any] = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "12 C", "tool_call_id": "call_1"},
]


def test_a_template_that_renders_tools_gets_them_and_calls_with_object_arguments() -> None:
    template = "{% for m in messages %}{{ m.tool_calls }}{% endfor %}{{ tools }}"
    messages, definitions = template_conversation(CONVERSATION, tools(WEATHER), template)
    assert definitions == [WEATHER]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert messages[0] == CONVERSATION[0] and messages[2] == CONVERSATION[2]


def test_a_template_without_tools_gets_them_in_the_system_message() -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    messages, definitions = template_conversation(CONVERSATION, tools(WEATHER), template)
    assert definitions is None
    assert messages[0]["role"] == "system"
    assert json.loads(messages[0]["content"].splitlines()[1]) == WEATHER["function"]
    # the assistant's call as the text a required call is decoded as
    assert json.loads(messages[2]["content"]) == [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}
    ]
    # an existing system message is added to, not doubled
    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    messages, _ = template_conversation(with_system, tools(WEATHER), template)
    assert messages[0]["content"].startswith("Be brief.\n\n")
    assert [m["role"] for m in messages].count("system") == 1


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": QUESTION, **fields}


def test_a_chat_request_with_a_forced_call_maps_onto_the_spec() -> None:
    request = chat_request(body(tools=[WEATHER], tool_choice=named("get_weather")), 100)
    job_spec = request.job.spec
    assert job_spec.calls_tools and job_spec.tools is not None
    assert job_spec.tools[0].function.name == "get_weather"
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [CALL], "refusal": None},
        {"role": "tool", "content": "12 C", "tool_call_id": "call_1"},
    ]
    request = chat_request(body(messages=history, tools=[WEATHER], tool_choice="none"), 100)
    assert not request.job.spec.calls_tools
    [conversation] = request.job.spec.messages or []
    assert conversation[1].tool_calls is not None and conversation[2].tool_call_id == "call_1"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": [WEATHER], "tool_choice": named("nope")}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "bad name"}}],
                "tool_choice": "required",
            },
            "tools[0].function.name",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": "no"},
            "parallel_tool_calls",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (
            {
                "messages": [*QUESTION, {"role": "tool", "content": "x"}],
                "tools": [WEATHER],
                "tool_choice": "none",
            },
            "messages[1]",
        ),
        (
            {
                "messages": [
                    *QUESTION,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {**CALL, "function": {"name": "get_weather", "arguments": "[1]"}}
                        ],
                    },
                ],
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError) as refused:
        chat_request(body(**fields), 100)
    assert refused.value.param is not None
    assert refused.value.param.startswith(param)


def test_tools_without_a_choice_are_auto_as_openais_default() -> None:
    assert chat_request(body(tools=[WEATHER]), 100).job.spec.tool_choice == "auto"
    assert not chat_request(body(tools=[WEATHER], tool_choice="auto"), 100).job.spec.calls_tools


def record(text: str, data: dict[str, Any] | None, finish: str = "stop") -> OutputRecord:
    return OutputRecord(
        prompt_index=0,
        sequence_index=0,
        text=text,
        finish_reason=finish,
        prompt_tokens=3,
        completion_tokens=5,
        data=data,
    )


def test_calls_answer_in_openais_message_and_chunk_shapes() -> None:
    calls = [
        {"id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    ]
    answer = completion_object(
        chat=True,
        completion_id="chatcmpl-1",
        model="m",
        created=1,
        texts=[record("", {TOOL_CALLS: calls}, "tool_calls")],  # no text before the calls
        per_prompt=1,
    )
    message = ChatCompletion.model_validate(answer).choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    assert message.tool_calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    chunk = chunk_object(
        chat=True,
        completion_id="c",
        model="m",
        created=1,
        index=0,
        tool_calls=[{"index": 0, **calls[0]}],
    )
    [delta_call] = ChatCompletionChunk.model_validate(chunk).choices[0].delta.tool_calls or []
    assert (delta_call.index, delta_call.id) == (0, "call_x")


def test_a_named_call_cut_short_is_still_the_call_a_required_one_is_text() -> None:
    weather = tools(WEATHER, TIME)
    choice = spec(tools=[WEATHER, TIME], tool_choice=named("get_weather")).tool_choice
    cut = answered_calls('{"city": "Os', "length", weather, choice, "c", 0)
    assert cut is not None and cut.finish_reason == "length" and cut.content is None
    assert cut.calls[0]["function"]["arguments"] == '{"city": "Os'
    assert answered_calls('{"city": "Oslo"}', "stop", weather, choice, "c", 0) is not None
    assert (
        answered_calls('[{"name": "get_time", "arg', "length", weather, "required", "c", 0) is None
    )
    assert answered_calls("[]", "stop", weather, "none", "c", 0) is None
    text = '[{"name": "get_time", "arguments": {}}]'
    whole = answered_calls(text, "stop", weather, "required", "c", 0)
    assert whole is not None and whole.finish_reason == "tool_calls" and len(whole.calls) == 1


HERMES = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>'
)


def test_auto_reads_calls_in_hermes_format_and_the_text_before_them() -> None:
    weather = tools(WEATHER, TIME)
    answer = answered_calls(HERMES, "stop", weather, "auto", "chatcmpl-1", 0)
    assert answer is not None
    assert (answer.content, answer.finish_reason) == ("Let me check.", "tool_calls")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in answer.calls] == [
        ("get_weather", '{"city": "Oslo"}'),
        ("get_time", "{}"),  # arguments written as JSON text are read too
    ]
    only_call = answered_calls(
        HERMES[HERMES.index("<tool_call>") :], "stop", weather, "auto", "c", 0
    )
    assert only_call is not None and only_call.content is None
    # text without a call, a call to no tool, a block that is not JSON: text
    for text in (
        "It is sunny.",
        '<tool_call>{"name": "send_mail", "arguments": {}}</tool_call>',
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"name": "get_time", "arguments": {}}',  # never closed
    ):
        assert answered_calls(text, "stop", weather, "auto", "c", 0) is None


@pytest.mark.parametrize(
    ("text", "sendable"),
    [
        ("Hello", 5),
        ("Hello <", 6),  # "<" may open a call: held
        ("Hello <tool", 6),
        ("Hello <b>", 9),  # it did not
        ("Hi <tool_call>{", 3),
        ("", 0),
    ],
)
def test_auto_streams_content_short_of_what_may_be_a_call(text: str, sendable: int) -> None:
    assert sendable_content(text) == sendable


def test_auto_needs_a_template_that_shows_the_call_format() -> None:
    assert writes_calls("{{ tools }} <tool_call>{{ call }}</tool_call>")
    assert not writes_calls("{{ tools }}")  # tools shown, but no format to read
    assert not writes_calls(None)


class TemplateTokenizer:
    """What core.prompts.encode_prompts calls: a template and a character per token."""

    def __init__(self, chat_template: str) -> None:
        self.chat_template = chat_template
        self.rendered: list[tuple[list[dict[str, Any]], Any]] = []

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: Any,
        tokenize: bool,
        add_generation_prompt: bool,
    ) -> str:
        self.rendered.append((messages, tools))
        return json.dumps(messages)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_auto_is_refused_for_a_model_whose_template_shows_no_call_format() -> None:
    auto = spec(tools=[WEATHER], tool_choice="auto")
    with pytest.raises(PromptError) as refused:
        encode_prompts(TemplateTokenizer("{{ messages }}{{ tools }}"), auto, None)
    assert refused.value.param == "spec.tool_choice"
    hermes = TemplateTokenizer("{{ messages }}{{ tools }}<tool_call>")
    [ids] = encode_prompts(hermes, auto, None)
    assert ids and hermes.rendered[0][1] == [WEATHER]  # the template got the tools
    # forced calls need no format of the model's own
    encode_prompts(
        TemplateTokenizer("{{ messages }}"), spec(tools=[WEATHER], tool_choice="required"), None
    )
