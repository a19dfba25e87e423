"""response_format in GenerateSpec: OpenAI's three shapes, and the JSON Schema checker that
refuses, at submit, what decoding cannot enforce (naming the keyword and where it is)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from core.response_format import (
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    ResponseFormatText,
    check_schema,
    grammar_schema,
)
from core.specs import GenerateSpec


def spec(response_format: Any) -> GenerateSpec:
    return GenerateSpec.model_validate(
        {"model": "tiny-gpt2", "prompts": ["x"], "response_format": response_format}
    )


def json_schema(schema: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, **extra}}


ORDER = {
    "$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string"}}}},
    "type": "object",
    "title": "An order",
    "properties": {
        "id": {"type": "string", "pattern": "^ORD-[0-9]{4}$", "description": "the id"},
        "status": {"enum": ["new", "shipped"]},
        "kind": {"const": "order"},
        "total": {"type": "number", "minimum": 0, "exclusiveMaximum": 1e6},
        "count": {"type": ["integer", "null"], "maximum": 99},
        "when": {"type": "string", "format": "date-time"},
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1},
        "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
        "note": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]},
        "extra": {"type": "object", "additionalProperties": {"type": "boolean"}},
        "both": {"allOf": [{"type": "string"}, {"minLength": 2}]},
    },
    "required": ["id", "status", "items"],
    "additionalProperties": False,
}


def test_the_three_openai_shapes() -> None:
    assert isinstance(spec({"type": "text"}).response_format, ResponseFormatText)
    assert isinstance(spec({"type": "json_object"}).response_format, ResponseFormatJsonObject)
    rf = spec(json_schema(ORDER, strict=True, description="an order")).response_format
    assert isinstance(rf, ResponseFormatJsonSchema)
    assert rf.json_schema.name == "answer" and rf.json_schema.strict is True
    assert grammar_schema(rf) == ORDER
    assert grammar_schema(spec({"type": "json_object"}).response_format) == {"type": "object"}
    assert grammar_schema(spec({"type": "text"}).response_format) is None
    assert grammar_schema(None) is None


def test_a_spec_with_a_schema_survives_its_json_round_trip() -> None:
    s = spec(json_schema(ORDER))
    dumped = s.model_dump(mode="json")
    assert dumped["response_format"]["json_schema"]["schema"] == ORDER
    assert GenerateSpec.model_validate(json.loads(json.dumps(dumped))) == s


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_object", "schema": {}},
        {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "other": 1}},
        {"type": "json_schema", "json_schema": {"schema": {}}},
    ],
)
def test_malformed_response_formats_are_refused(response_format: Any) -> None:
    with pytest.raises(ValidationError):
        spec(response_format)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (
            {"type": "object", "properties": {"a": {"patternProperties": {"^x": {}}}}},
            "response_format.json_schema.schema.properties.a: 'patternProperties' is not supported",
        ),
        ({"not": {"type": "string"}}, "response_format.json_schema.schema: 'not' is not supported"),
        (
            {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
            "schema: 'uniqueItems' is not supported",
        ),
        (
            {"properties": {"a": {"if": {}, "then": {}}}},
            "schema.properties.a: 'if' is not supported",
        ),
        (
            {"anyOf": [{"type": "string"}, {"dependentRequired": {}}]},
            "schema.anyOf[1]: 'dependentRequired' is not supported",
        ),
        ({"type": "integer", "multipleOf": 3}, "schema: 'multipleOf' is not supported"),
        ({"type": "object", "minProperties": 1}, "schema: 'minProperties' is not supported"),
        ({"$ref": "https://example.com/s.json"}, "schema.$ref: 'https://example.com/s.json'"),
        ({"$ref": "#/$defs/missing"}, "schema.$ref: '#/$defs/missing' is not supported"),
        ({"type": "string", "format": "uri"}, "schema.format: format 'uri' is not supported"),
        ({"type": "text"}, "schema.type: 'text' is not a JSON Schema type"),
        ({"type": "string", "maxLength": -1}, "schema.maxLength: must be a non-negative integer"),
        ({"enum": []}, "schema.enum: must be a non-empty array"),
        ({"anyOf": []}, "schema.anyOf: must be a non-empty array of schemas"),
        ({"properties": {"a": 3}}, "schema.properties.a: a schema must be an object"),
        (
            {
                "type": "object",
                "properties": {"a": {}},
                "required": ["b"],
                "additionalProperties": False,
            },
            "schema.required: 'b' is required but not in properties",
        ),
    ],
)
def test_unenforceable_schemas_name_the_keyword_and_its_path(
    schema: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        check_schema(schema)
    assert message in str(info.value)
    with pytest.raises(ValidationError) as validation:
        spec(json_schema(schema))
    assert message in str(validation.value)


def test_schema_size_and_depth_are_bounded() -> None:
    big = {"enum": ["x" * 1000] * (MAX_SCHEMA_BYTES // 1000 + 1)}
    with pytest.raises(ValueError, match="bytes of JSON; at most 65536"):
        check_schema(big)
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH + 1):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ValueError, match="nest deeper than 16 levels"):
        check_schema(deep)
    check_schema(deep["items"])  # one level less is fine


def test_accepted_schemas() -> None:
    check_schema(ORDER)
    check_schema({})
    check_schema({"type": "object", "properties": {"a": True, "b": False}})
    check_schema({"definitions": {"n": {"type": "integer"}}, "$ref": "#/definitions/n"})
    check_schema({"type": "array", "prefixItems": [{"type": "string"}], "items": False})
    check_schema({"$ref": "#"} | {"type": "object"})
