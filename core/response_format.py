"""`response_format` in OpenAI's shape, and the JSON Schema subset decoding can enforce.

A generate request may ask for `{"type": "text"}` (no constraint), `{"type":
"json_object"}` (any JSON object) or `{"type": "json_schema", "json_schema": {"name",
"schema", "strict", "description"}}`. The workers enforce the last two while decoding
(workers/generation/grammar.py, with llguidance), so a schema is checked here, at
submit, against what that enforcement supports: a schema that asks for something it
cannot guarantee (`patternProperties`, `not`, `uniqueItems`, a remote `$ref`, ...) is
refused with the keyword and where it is, instead of being quietly ignored and
producing output that does not validate. Pure Python: core/ imports no grammar library.

One known gap: `oneOf` is accepted here, but llguidance compiles it only when its
branches cannot match the same value; overlapping branches fail the job at the worker
(invalid_spec) rather than at submit, since telling them apart means compiling.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

# How the grammar library writes JSON: one way (Python's `json.dumps` spacing), so a model
# cannot spend its tokens on whitespace; what it writes is still any JSON the schema allows.
# Passed as overrides, so a schema's own "x-guidance" (refused below) cannot change them.
# The workers compile with these, and the API validates a schema's grammar with the same.
JSON_GRAMMAR_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 16  # nested schemas (properties, items, anyOf, ...), not JSON nesting

SCHEMA_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
"""Keywords that do not constrain a value: accepted and not enforced (nothing to enforce)."""

FORMATS = frozenset(
    {"date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
)

_SUBSCHEMA = "schema"
_SUBSCHEMA_MAP = "map"  # {name: schema}
_SUBSCHEMA_LIST = "list"  # [schema, ...]

ENFORCED: dict[str, str] = {
    "type": "type",
    "enum": "value",
    "const": "value",
    "properties": _SUBSCHEMA_MAP,
    "required": "names",
    "additionalProperties": _SUBSCHEMA,  # or a boolean
    "items": _SUBSCHEMA,  # or false after prefixItems
    "prefixItems": _SUBSCHEMA_LIST,
    "minItems": "count",
    "maxItems": "count",
    "minLength": "count",
    "maxLength": "count",
    "minimum": "number",
    "maximum": "number",
    "exclusiveMinimum": "number",
    "exclusiveMaximum": "number",
    "pattern": "regex",
    "format": "format",
    "anyOf": _SUBSCHEMA_LIST,
    "oneOf": _SUBSCHEMA_LIST,
    "allOf": _SUBSCHEMA_LIST,
    "$ref": "ref",
    "$defs": _SUBSCHEMA_MAP,
    "definitions": _SUBSCHEMA_MAP,
}
"""Keywords enforced while decoding, with the kind of value each takes."""


class ResponseFormatText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    """OpenAI's `json_schema` object. `strict` is accepted either way: the schema is
    always enforced (and refused at submit when it cannot be)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    schema_: dict[str, Any] = Field(alias="schema", default_factory=lambda: {"type": "object"})
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _enforceable(cls, schema: dict[str, Any]) -> dict[str, Any]:
        check_schema(schema)
        return schema


class ResponseFormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
    Field(discriminator="type"),
]


def grammar_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON Schema a response format constrains output to; None for plain text."""
    if isinstance(response_format, ResponseFormatJsonSchema):
        return response_format.json_schema.schema_
    if isinstance(response_format, ResponseFormatJsonObject):
        return {"type": "object"}
    return None


RESPONSE_SCHEMA_FIELD = "response_format.json_schema.schema"


class _Refused(ValueError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")


def check_schema(schema: dict[str, Any], field: str = RESPONSE_SCHEMA_FIELD) -> None:
    """Refuse (ValueError naming the keyword and its path, starting at `field`) what decoding
    cannot enforce."""
    try:
        size = len(json.dumps(schema, allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise _Refused(field, f"not JSON: {exc}") from None
    if size > MAX_SCHEMA_BYTES:
        raise _Refused(field, f"{size} bytes of JSON; at most {MAX_SCHEMA_BYTES} are allowed")
    defs = {
        f"#/{group}/{name}"
        for group in ("$defs", "definitions")
        for name in (schema.get(group) or {})
        if isinstance(schema.get(group), dict)
    }
    _check(schema, field, 0, defs | {"#"})


def _check(schema: Any, path: str, depth: int, refs: set[str]) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise _Refused(path, "a schema must be an object or a boolean")
    if depth > MAX_SCHEMA_DEPTH:
        raise _Refused(path, f"schemas nest deeper than {MAX_SCHEMA_DEPTH} levels")
    for key, value in schema.items():
        where = f"{path}.{key}"
        if key in ANNOTATIONS:
            continue
        kind = ENFORCED.get(key)
        if kind is None:
            raise _Refused(path, f"{key!r} is not supported")
        if kind in (_SUBSCHEMA, _SUBSCHEMA_MAP, _SUBSCHEMA_LIST):
            for sub_path, sub in _subschemas(value, where, kind):
                _check(sub, sub_path, depth + 1, refs)
        else:
            _check_value(key, kind, value, where, refs)
    if "properties" in schema and "required" in schema:
        missing = set(schema["required"]) - set(schema["properties"])
        if missing and schema.get("additionalProperties") is False:
            raise _Refused(
                f"{path}.required",
                f"{sorted(missing)[0]!r} is required but not in properties "
                "and additionalProperties is false: no value can match",
            )


def _subschemas(value: Any, where: str, kind: str) -> Iterator[tuple[str, Any]]:
    if kind == _SUBSCHEMA:
        yield where, value
    elif kind == _SUBSCHEMA_MAP:
        if not isinstance(value, dict):
            raise _Refused(where, "must be an object of schemas")
        for name, sub in value.items():
            yield f"{where}.{name}", sub
    else:
        if not isinstance(value, list) or not value:
            raise _Refused(where, "must be a non-empty array of schemas")
        for i, sub in enumerate(value):
            yield f"{where}[{i}]", sub


def _check_value(key: str, kind: str, value: Any, where: str, refs: set[str]) -> None:
    if kind == "type":
        names = value if isinstance(value, list) else [value]
        bad = [n for n in names if not isinstance(n, str) or n not in SCHEMA_TYPES]
        if bad or not names:
            raise _Refused(where, f"{bad[0] if bad else value!r} is not a JSON Schema type")
    elif kind == "value" and key == "enum":
        if not isinstance(value, list) or not value:
            raise _Refused(where, "must be a non-empty array")
    elif kind == "names":
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise _Refused(where, "must be an array of property names")
    elif kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _Refused(where, "must be a non-negative integer")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Refused(where, "must be a number")
    elif kind == "regex":
        if not isinstance(value, str):
            raise _Refused(where, "must be a string")
    elif kind == "format":
        if value not in FORMATS:
            raise _Refused(where, f"format {value!r} is not supported")
    elif kind == "ref" and value not in refs:
        raise _Refused(
            where, f"{value!r} is not supported (only #, #/$defs/... and #/definitions/...)"
        )
