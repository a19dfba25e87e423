"""Function tools through `/v1/chat/completions` of a real stack, with OpenAI's SDK and
LangChain: a forced call (required, or a named function) is decoded under its schema by a
real worker and answered as `tool_calls`, whole or streamed; a conversation that gives a
call's result back is answered in text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from openai import OpenAI
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionToolParam,
)
from pydantic import BaseModel

from tests.conftest import TINY_CHAT_MODEL, install_tiny_chat_model
from tests.e2e.test_openai_serving import langchain_chat
from tests.support.harness import TERMINAL, Stack, wait_for
from tests.support.tiny_model import with_chat_template

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# What tools change is the request, the decoding and the answer, none of it the database's:
# test_openai_serving.py runs the same job and output path on SQLite and PostgreSQL.
BACKENDS = ["sqlite"]

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Oslo?"}
]
CALL_WEATHER: ChatCompletionNamedToolChoiceParam = {
    "type": "function",
    "function": {"name": "get_weather"},
}
# bounded arguments: a random-weight model completes them within a few tokens
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Oslo", "Bergen"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The forecast", "parameters": WEATHER_ARGS},
}
TIME: ChatCompletionToolParam = {"type": "function", "function": {"name": "get_time"}}


HERMES_MODEL = "tiny-gpt2-hermes"
# shows the tools and Hermes' call format, as Qwen's and SmolLM3's templates do
HERMES_TEMPLATE = (
    "{% if tools %}<|system|>You may call: {{ tools | tojson }}. To call one, write "
    '<tool_call>{"name": ..., "arguments": ...}</tool_call>\n{% endif %}'
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def serving(stack: Stack, tiny_model_dir: Path) -> Stack:
    install_tiny_chat_model(tiny_model_dir, stack.workdir / "data")
    with_chat_template(
        tiny_model_dir, stack.workdir / "data" / "models" / HERMES_MODEL, HERMES_TEMPLATE
    )
    return stack


@pytest.fixture(scope="module")
def client(serving: Stack) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{serving.base_url}/v1", api_key=serving.api_key, max_retries=0) as c:
        yield c


def test_a_named_function_is_called_with_arguments_its_schema_accepts(
    serving: Stack, client: OpenAI
) -> None:
    for seed in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model=TINY_CHAT_MODEL,
            messages=QUESTION,
            tools=[WEATHER, TIME],
            tool_choice=CALL_WEATHER,
            max_completion_tokens=40,
            seed=seed,
        )
        answer = raw.parse()
        [choice] = answer.choices
        assert choice.finish_reason == "stop"  # OpenAI's for a named function
        assert choice.message.content is None
        [call] = choice.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)  # type: ignore[union-attr]
        # the job holds the call as its text; reading the answer again gives the same id
        job_id = raw.headers["Modelyard-Job-Id"]
        [stored] = serving.outputs(job_id)
        assert stored["text"] == call.function.arguments  # type: ignore[union-attr]


def test_required_calls_stream_as_the_whole_answer_gives_them(client: OpenAI) -> None:
    common: dict[str, Any] = {
        "model": TINY_CHAT_MODEL,
        "messages": QUESTION,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_completion_tokens": 60,
        "seed": 7,
    }
    whole = client.chat.completions.create(**common)
    [choice] = whole.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    if call.function.name == "get_weather":  # type: ignore[union-attr]
        jsonschema.validate(arguments, WEATHER_ARGS)
    else:
        assert arguments == {}
    streamed: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in client.chat.completions.create(**common, stream=True):
        for part in chunk.choices[0].delta.tool_calls or []:
            entry = streamed.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += part.id or ""
            entry["name"] += (part.function.name if part.function else None) or ""
            entry["arguments"] += (part.function.arguments if part.function else None) or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls"
    assert streamed == {
        0: {
            "id": streamed[0]["id"],
            "name": call.function.name,  # type: ignore[union-attr]
            "arguments": call.function.arguments,  # type: ignore[union-attr]
        }
    }


def test_a_named_call_streams_its_arguments_as_they_are_decoded(client: OpenAI) -> None:
    common: dict[str, Any] = {
        "model": TINY_CHAT_MODEL,
        "messages": QUESTION,
        "tools": [WEATHER],
        "tool_choice": CALL_WEATHER,
        "max_completion_tokens": 40,
        "seed": 11,
    }
    [whole] = client.chat.completions.create(**common).choices[0].message.tool_calls or []
    parts = [
        part
        for chunk in client.chat.completions.create(**common, stream=True)
        for part in chunk.choices[0].delta.tool_calls or []
    ]
    assert len(parts) > 1  # the arguments came piece by piece, not at the end
    first, *rest = parts
    assert first.type == "function" and (first.id or "").startswith("call_")
    assert first.function is not None and first.function.name == "get_weather"
    assert all(p.index == 0 and p.id is None for p in rest)
    arguments = "".join((p.function.arguments if p.function else None) or "" for p in parts)
    assert arguments == whole.function.arguments  # type: ignore[union-attr]


def test_a_named_call_cut_short_is_still_the_call_with_finish_reason_length(
    client: OpenAI,
) -> None:
    answer = client.chat.completions.create(
        model=TINY_CHAT_MODEL,
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice=CALL_WEATHER,
        max_completion_tokens=3,
        seed=1,
    )
    [choice] = answer.choices
    assert choice.finish_reason == "length"
    [call] = choice.message.tool_calls or []
    assert call.function.arguments.startswith("{")  # type: ignore[union-attr]
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)  # type: ignore[union-attr]


class Item(BaseModel):
    sku: Literal["A1", "B2"]
    qty: Literal[1, 2, 3]


class PlaceOrder(BaseModel):
    """Nested models: the tool's parameters carry $defs."""

    item: Item
    gift: bool


def test_sdk_parse_gives_the_pydantic_arguments_of_a_function_tool(client: OpenAI) -> None:
    parsed = client.chat.completions.parse(
        model=TINY_CHAT_MODEL,
        messages=[{"role": "user", "content": "Order two A1, please."}],
        tools=[openai.pydantic_function_tool(PlaceOrder)],
        tool_choice={"type": "function", "function": {"name": "PlaceOrder"}},
        max_completion_tokens=60,
        seed=1,
    )
    [call] = parsed.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, PlaceOrder)


def test_a_conversation_with_a_calls_result_is_answered_in_text(client: OpenAI) -> None:
    first = client.chat.completions.create(
        model=TINY_CHAT_MODEL,
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_completion_tokens=60,
        seed=3,
    )
    message = first.choices[0].message
    [call] = message.tool_calls or []
    answer = client.chat.completions.create(
        model=TINY_CHAT_MODEL,
        messages=[
            *QUESTION,
            message,  # the assistant's message as the SDK returned it
            {"role": "tool", "tool_call_id": call.id, "content": "12 C and sunny"},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_completion_tokens=8,
        temperature=0,
    )
    [choice] = answer.choices
    assert choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")


def test_auto_and_bad_tools_are_400s_that_create_no_job(serving: Stack, client: OpenAI) -> None:
    with serving.client() as http:
        before = len(http.get("/v1/jobs", params={"limit": 100}).json()["data"])
    with pytest.raises(openai.BadRequestError) as auto:
        client.chat.completions.create(
            model=TINY_CHAT_MODEL,
            messages=QUESTION,
            tools=[WEATHER],
        )
    assert auto.value.body["param"] == "tool_choice"  # type: ignore[index]
    unenforceable: ChatCompletionToolParam = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "not": {"required": ["a"]}}},
    }
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=TINY_CHAT_MODEL,
            messages=QUESTION,
            tools=[unenforceable],
            tool_choice="required",
        )
    assert bad.value.body["param"].startswith("tools")  # type: ignore[index]
    with serving.client() as http:
        assert len(http.get("/v1/jobs", params={"limit": 100}).json()["data"]) == before


class Forecast(BaseModel):
    city: Literal["Oslo", "Bergen"]
    days: Literal[1, 2, 3]


def test_langchain_structured_output_by_function_calling(serving: Stack) -> None:
    chat = langchain_chat(serving, 100)
    forecast = chat.with_structured_output(Forecast, method="function_calling").invoke(
        "Weather in Oslo for two days?"
    )
    assert isinstance(forecast, Forecast)
    called = chat.bind_tools([Forecast], tool_choice="required", parallel_tool_calls=False).invoke(
        "Weather in Bergen?"
    )
    [tool_call] = called.tool_calls
    assert tool_call["name"] == "Forecast"
    assert Forecast.model_validate(tool_call["args"])


def test_a_batch_of_forced_calls_answers_tool_calls_in_its_output_file(client: OpenAI) -> None:
    lines = [
        {
            "custom_id": f"call-{seed}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": TINY_CHAT_MODEL,
                "messages": QUESTION,
                "tools": [WEATHER, TIME],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "max_completion_tokens": 40,
                "seed": seed,
            },
        }
        for seed in range(2)
    ]
    raw = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
    requests = client.files.create(file=("calls.jsonl", raw), purpose="batch")
    created = client.batches.create(
        input_file_id=requests.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def finished() -> Any:
        b = client.batches.retrieve(created.id)
        return b if b.status in ("completed", "failed", "expired", "cancelled") else None

    batch = wait_for(finished, 120, "batch done", 0.3)
    assert batch.status == "completed" and batch.output_file_id is not None, batch.errors
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == ["call-0", "call-1"]
    for line in out:
        [choice] = ChatCompletion.model_validate(line["response"]["body"]).choices
        assert choice.finish_reason == "stop" and choice.message.content is None
        [call] = choice.message.tool_calls or []
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)  # type: ignore[union-attr]


def test_auto_on_a_model_that_writes_hermes_calls_answers_its_text_or_calls(
    client: OpenAI,
) -> None:
    """The random model writes no call: its answer is text, streamed as the whole answer
    gives it (what might open a call held back, then let through). Reading calls from a
    model's text: tests/unit/test_tools.py and test_tool_stream.py."""
    common: dict[str, Any] = {
        "model": HERMES_MODEL,
        "messages": QUESTION,
        "tools": [WEATHER, TIME],  # no tool_choice: OpenAI's default, auto
        "max_completion_tokens": 24,
        "temperature": 0,
    }
    [choice] = client.chat.completions.create(**common).choices
    assert choice.message.tool_calls is None
    assert isinstance(choice.message.content, str) and choice.message.content
    chunks = list(client.chat.completions.create(**common, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def tool_rows(count: int) -> bytes:
    """OpenAI's fine-tuning rows with tools: a call, its result, the answer."""
    rows = []
    for i in range(count):
        city = ("Oslo", "Bergen")[i % 2]
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "days": 1})},
        }
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Weather in {city}?"},
                    {"role": "assistant", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"call_{i}", "content": "sunny"},
                    {"role": "assistant", "content": f"It is sunny in {city}."},
                ],
                "tools": [WEATHER],
                "parallel_tool_calls": False,
            }
        )
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def test_a_model_fine_tuned_on_tool_rows_is_called_with_tools(
    serving: Stack, client: OpenAI
) -> None:
    """Rows with tools train (the tools in the system message of a template that shows
    none: longer than OpenAI's route's default 128 tokens, so the job sets max_length)."""
    uploaded = client.files.create(file=("tools.jsonl", tool_rows(8)), purpose="fine-tune")
    spec = {
        "base_model": TINY_CHAT_MODEL,
        "task": "causal_lm",
        "training_dataset": uploaded.id,
        "suffix": "tools",
        "hyperparameters": {"epochs": 1, "batch_size": 4, "max_length": 512},
    }
    with serving.client() as http:
        report = http.get(f"/v1/datasets/{uploaded.id}").json()["report"]
        assert report["warnings"] == []  # tools and parallel_tool_calls are not ignored keys
        job = http.post("/v1/jobs", json={"kind": "finetune", "spec": spec}).json()
    done = serving.wait_status(job["id"], TERMINAL, timeout=180)
    assert done["status"] == "succeeded", f"{done}\n{serving.logs()}"
    answer = client.chat.completions.create(
        model=done["result"]["model"],
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice=CALL_WEATHER,
        max_completion_tokens=40,
        seed=2,
    )
    [call] = answer.choices[0].message.tool_calls or []
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)  # type: ignore[union-attr]
