"""response_format enforced while decoding, on the tiny GPT-2 with random weights.

A random model writes nonsense, so what these show is the grammar's doing: every output
that stops is JSON that validates, whatever the model wanted; bounded schemas (maxLength,
maxItems, enums, integer ranges) always stop; rows without a format decode exactly as
they would alone, constrained rows beside them or not.
"""

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
from transformers import AutoTokenizer

from core.enums import FailureType
from core.errors import PermanentJobError
from core.response_format import FORMATS, check_schema
from core.settings import Settings
from core.specs import GenerateSpec
from tests.conftest import TINY_MODEL
from tests.unit.test_response_format import ORDER
from workers.generation import grammar as grammar_module
from workers.generation.cache import ModelCache
from workers.generation.engine import TransformersEngine, base_of, open_engine
from workers.generation.requests import GenerationRequest

Texts = list[tuple[int, int, str, str]]

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "plan": {"enum": ["free", "pro"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "member", "plan", "tags"],
    "additionalProperties": False,
}
LONG = {"max_new_tokens": 200}  # PERSON takes a random model 50-70 tokens


@pytest.fixture(scope="module")
def settings(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data = tmp_path_factory.mktemp("data")
    shutil.copytree(tiny_model_dir, data / "models" / TINY_MODEL)
    return Settings(data_dir=data, generation_max_sequences=16)


def cpu_engine(settings: Settings, model: str) -> TransformersEngine:
    """An engine (and its own model cache) on the CPU for `model`'s base."""
    engine, _ = open_engine(settings, "cpu", base_of(settings, model)[0], cache=ModelCache(2**30))
    return engine


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[TransformersEngine]:
    """One engine (and model cache) for the module: its grammars are compiled once."""
    yield cpu_engine(settings, TINY_MODEL)


def spec(**fields: Any) -> GenerateSpec:
    return GenerateSpec.model_validate({"model": TINY_MODEL, "prompts": ["The blue mug"], **fields})


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def run(engine: TransformersEngine, requests: dict[str, GenerateSpec]) -> dict[str, Texts]:
    for key, s in requests.items():
        engine.add(GenerationRequest(key, s))
    ended: dict[str, Texts] = {}
    while engine.has_work:
        out = engine.step()
        assert not out.failed, out.failed
        for f in out.finished:
            ended[f.key] = [
                (t.prompt_index, t.sequence_index, t.text, t.finish_reason) for t in f.texts
            ]
    return ended


def test_json_object_outputs_that_stop_are_json_objects(engine: TransformersEngine) -> None:
    (out,) = run(
        engine,
        {"o": spec(response_format={"type": "json_object"}, seed=3, num_return_sequences=12)},
    ).values()
    stopped = [text for _, _, text, reason in out if reason == "stop"]
    assert stopped  # a random model closes some objects within 64 tokens
    for text in stopped:
        assert isinstance(json.loads(text), dict)
    for _, _, text, _ in out:
        assert text.startswith("{")  # even the cut ones are the start of an object


def test_json_schema_outputs_stop_and_validate(engine: TransformersEngine) -> None:
    (out,) = run(
        engine,
        {"p": spec(response_format=schema_format(PERSON), seed=5, num_return_sequences=8, **LONG)},
    ).values()
    assert [reason for *_, reason in out] == ["stop"] * 8
    for _, _, text, _ in out:
        jsonschema.validate(json.loads(text), PERSON)
    assert len({text for _, _, text, _ in out}) > 1  # sampling still applies within the grammar


def test_greedy_and_seeded_constrained_rows_are_reproducible(engine: TransformersEngine) -> None:
    greedy = spec(response_format=schema_format(PERSON), temperature=0, **LONG)
    seeded = spec(response_format=schema_format(PERSON), seed=11, top_p=0.9, top_k=50, **LONG)
    first, again = run(engine, {"g": greedy, "s": seeded}), run(engine, {"g": greedy, "s": seeded})
    assert first == again
    assert first["g"][0][3] == "stop"
    jsonschema.validate(json.loads(first["g"][0][2]), PERSON)


def test_rows_without_a_format_are_untouched_by_constrained_rows_beside_them(
    engine: TransformersEngine,
) -> None:
    plain = {
        "greedy": spec(temperature=0, max_new_tokens=30, prompts=["Fresh bread", "Our support"]),
        "seeded": spec(temperature=0.9, seed=7, top_p=0.8, num_return_sequences=2),
        "text": spec(temperature=0, max_new_tokens=20, response_format={"type": "text"}),
    }
    constrained = {
        "person": spec(
            response_format=schema_format(PERSON), seed=1, num_return_sequences=3, **LONG
        ),
        "object": spec(response_format={"type": "json_object"}, seed=2),
    }
    alone = {key: run(engine, {key: s})[key] for key, s in {**plain, **constrained}.items()}
    together = run(engine, {**constrained, **plain})
    assert together == alone


def test_a_grammar_is_compiled_once_per_model_and_schema(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[str] = []
    real = grammar_module.Grammars._compile

    def counting(self: grammar_module.Grammars, schema: dict[str, Any]) -> Any:
        compiled.append(json.dumps(schema))
        return real(self, schema)

    monkeypatch.setattr(grammar_module.Grammars, "_compile", counting)
    fresh = {"type": "object", "properties": {"only": {"type": "boolean"}}, "required": ["only"]}
    run(engine, {"a": spec(response_format=schema_format(fresh), num_return_sequences=4, seed=1)})
    run(engine, {"b": spec(response_format=schema_format(fresh), seed=2)})
    assert compiled == [json.dumps(fresh)]


@pytest.mark.parametrize(
    ("schema", "check"),
    [
        ({"type": "boolean"}, lambda v: isinstance(v, bool)),
        ({"type": "integer", "minimum": 0, "maximum": 99}, lambda v: 0 <= v <= 99),
        ({"enum": ["yes", "no", 3]}, lambda v: v in ("yes", "no", 3)),
    ],
)
def test_top_level_scalars_stop_without_an_end_of_text_token(
    engine: TransformersEngine, schema: dict[str, Any], check: Any
) -> None:
    """The tiny model has no EOS: a value that could go on ("7" of 0..99) is ended by the
    grammar's stop token (the pad), which the text leaves out."""
    (out,) = run(
        engine, {"s": spec(response_format=schema_format(schema), seed=4, num_return_sequences=6)}
    ).values()
    for _, _, text, reason in out:
        assert reason == "stop"
        assert check(json.loads(text)), text


def test_a_schema_the_grammar_library_refuses_fails_the_request_alone(
    engine: TransformersEngine,
) -> None:
    bad = spec(response_format=schema_format({"type": "string", "pattern": "(unclosed"}))
    with pytest.raises(PermanentJobError, match="response_format cannot be enforced") as info:
        engine.add(GenerationRequest("bad", bad))
    assert info.value.failure is FailureType.INVALID_SPEC
    assert not engine.has_work


ACCEPTED = [
    {"oneOf": [{"type": "string"}, {"type": "integer"}]},  # disjoint branches only
    {"type": "object", "properties": {"child": {"$ref": "#"}}},
    {"definitions": {"n": {"type": "integer"}}, "$ref": "#/definitions/n"},
    {"type": "array", "prefixItems": [{"type": "string"}], "items": False},
    {"type": "object", "properties": {"a": True, "b": False}},
    {"type": "string", "title": "t", "default": "x", "examples": ["a"], "deprecated": True},
    {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 5},
    {"const": {"a": [1, 2]}},
    *({"type": "string", "format": f} for f in sorted(FORMATS)),
]


def test_what_the_submit_checker_accepts_the_grammar_library_compiles(
    tiny_model_dir: Path,
) -> None:
    """core/response_format.py mirrors llguidance: a schema that passes it compiles."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    grammars = grammar_module.Grammars(tokenizer, len(tokenizer), frozenset(), 0)
    for schema in [ORDER, *ACCEPTED]:
        check_schema(schema)
        grammars.matcher(schema)
    overlapping = {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}
    check_schema(overlapping)  # past the checker; the API's grammar check refuses it at submit
    with pytest.raises(grammar_module.GrammarError, match="oneOf"):
        grammars.matcher(overlapping)


# --- property: any bounded schema of the supported kinds stops and validates --------------

NAMES = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
LEAVES = st.one_of(
    st.integers(0, 5).map(lambda n: {"type": "string", "maxLength": n}),
    st.tuples(st.integers(-50, 50), st.integers(0, 200)).map(
        lambda r: {"type": "integer", "minimum": r[0], "maximum": r[0] + r[1]}
    ),
    st.just({"type": "boolean"}),
    st.lists(
        st.one_of(NAMES, st.integers(-9, 9), st.booleans()), min_size=1, max_size=4, unique=True
    ).map(lambda values: {"enum": values}),
)
PROPERTIES = st.one_of(
    LEAVES,
    st.tuples(LEAVES, st.integers(0, 3)).map(
        lambda t: {"type": "array", "items": t[0], "maxItems": t[1]}
    ),
)


@st.composite
def object_schemas(draw: st.DrawFn) -> dict[str, Any]:
    properties = draw(st.dictionaries(NAMES, PROPERTIES, min_size=1, max_size=4))
    required = draw(st.lists(st.sampled_from(sorted(properties)), unique=True))
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


@hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(schema=object_schemas(), seed=st.integers(0, 2**16))
def test_any_bounded_schema_stops_and_validates(
    engine: TransformersEngine, schema: dict[str, Any], seed: int
) -> None:
    s = spec(response_format=schema_format(schema), seed=seed, max_new_tokens=600)
    ((_, _, text, reason),) = run(engine, {"h": s})["h"]
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), schema)
