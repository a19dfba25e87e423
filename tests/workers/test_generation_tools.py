"""A forced tool call decoded by the real engine: whatever bounded schemas two tools'
parameters have, `required` decodes one call that parses, names one of the tools and
whose arguments validate against that tool's parameters (property test), and a named
call decodes its function's arguments."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from core.settings import Settings
from core.specs import GenerateSpec
from core.tools import called
from tests.conftest import TINY_CHAT_MODEL
from tests.support.tiny_model import with_chat_template
from tests.workers.test_generation_structured import cpu_engine, object_schemas, run
from workers.generation.engine import TransformersEngine


@pytest.fixture(scope="module")
def settings(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data = tmp_path_factory.mktemp("data")
    with_chat_template(tiny_model_dir, data / "models" / TINY_CHAT_MODEL)
    return Settings(data_dir=data, generation_max_sequences=16)


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[TransformersEngine]:
    yield cpu_engine(settings, TINY_CHAT_MODEL)
    shutil.rmtree(settings.data_dir, ignore_errors=True)


def tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def spec(**fields: Any) -> GenerateSpec:
    return GenerateSpec.model_validate(
        {
            "model": TINY_CHAT_MODEL,
            "messages": [[{"role": "user", "content": "Look it up"}]],
            "max_new_tokens": 600,
            **fields,
        }
    )


@hypothesis_settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=object_schemas(), second=object_schemas(), seed=st.integers(0, 2**16))
def test_a_required_call_parses_and_its_arguments_validate(
    engine: TransformersEngine, first: dict[str, Any], second: dict[str, Any], seed: int
) -> None:
    schemas = {"lookup": first, "store": second}
    s = spec(
        tools=[tool(name, schema) for name, schema in schemas.items()],
        tool_choice="required",
        parallel_tool_calls=False,
        seed=seed,
    )
    ((_, _, text, reason),) = run(engine, {"t": s})["t"]
    assert reason == "stop", text
    assert s.tools is not None
    [call] = called(text, s.tools, s.tool_choice, "chatcmpl-x", 0) or []
    name = call["function"]["name"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])


def test_a_named_call_decodes_that_functions_arguments(engine: TransformersEngine) -> None:
    weather = {
        "type": "object",
        "properties": {"city": {"enum": ["Oslo", "Bergen"]}, "days": {"type": "boolean"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    s = spec(
        tools=[tool("get_weather", weather), tool("get_time", {"type": "object"})],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        seed=4,
        num_return_sequences=4,
    )
    texts = run(engine, {"n": s})["n"]
    assert [reason for *_, reason in texts] == ["stop"] * 4
    for _, _, text, _ in texts:
        jsonschema.validate(json.loads(text), weather)
