"""Names of JSON value types and paths into JSON values, for error messages about
uploaded files and request bodies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def json_type(value: Any) -> str:
    """'null', 'a boolean', 'a number', 'a string', 'an array' or 'an object'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def json_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a path into the value (messages[0].content), without
    the names pydantic gives the branches of a union (`constrained-str`, `list[TextPart]`)."""
    parts = [p for p in loc if isinstance(p, int) or p.isidentifier()]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
