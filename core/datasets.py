"""Dataset files: detect the format and schema, validate every row, normalize, report.

Pure functions over bytes, with no database and no web framework. The API validates
an upload with `parse_dataset` before it stores anything; workers re-read a stored
file with `load_dataset_rows`. A broken file raises `DatasetFormatError` naming the
first bad line; things that are suspicious but trainable (duplicates, very long rows,
BIO tags out of order, a single class) become warnings in the report.

Normalized rows per schema (see core.enums.DatasetSchema):
text {"text"}, prompt_completion {"prompt", "completion"},
chat {"messages": [{"role", "content"}, ...]}, classification {"text", "label"}
(label as str), pair_classification {"text", "text_pair", "label"},
token_classification {"tokens": [str], "tags": [str]},
batch_requests {"custom_id", "method", "url", "body"} (OpenAI batch input; see core.batch),
preference {"prompt", "chosen", "rejected"}: three texts, or three message lists (the prompt's
conversation, then the assistant's preferred and other answer). A preference file is TRL's
layout (those keys) or OpenAI's (`input.messages`, `preferred_output`, `non_preferred_output`,
normalized to message lists).
reinforcement {"messages", ...}: OpenAI's reinforcement fine-tuning rows, a prompt (messages
ending with a user message) and any other fields, kept as they are for the graders'
`{{item.<field>}}`. A JSON Lines file whose first row has `messages` ending with a user
message is one; its report's `item_fields` lists the fields every row has.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import heapq
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.batch import BatchRequestChecker, looks_like_batch_request
from core.enums import LABELLED_SCHEMAS, DatasetSchema
from core.errors import DatasetFormatError
from core.example_tokens import learned
from core.json_types import json_path, json_type
from core.tools import TOOL_CALL_LIST, TOOL_LIST


class DatasetFormat(StrEnum):
    """How a dataset file is laid out on disk; also the stored file's extension."""

    JSONL = "jsonl"
    CSV = "csv"
    CONLL = "conll"


FORMAT_FOR_EXTENSION: dict[str, DatasetFormat] = {
    ".jsonl": DatasetFormat.JSONL,
    ".json": DatasetFormat.JSONL,
    ".csv": DatasetFormat.CSV,
    ".conll": DatasetFormat.CONLL,
    ".bio": DatasetFormat.CONLL,
}
"""Extensions that decide the format; any other (.txt, .tsv, none) is sniffed."""

MAX_REPORTED_WARNINGS = 50
LONG_ROW_CHARS = 16_000
"""About 4,096 tokens, the largest max_length a job accepts; longer rows get truncated."""

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
KEYS_FOR_SCHEMA: dict[DatasetSchema, frozenset[str]] = {
    DatasetSchema.TEXT: frozenset({"text"}),
    DatasetSchema.PROMPT_COMPLETION: frozenset({"prompt", "completion"}),
    DatasetSchema.CHAT: frozenset({"messages"}),
    DatasetSchema.CLASSIFICATION: frozenset({"text", "label"}),
    DatasetSchema.PAIR_CLASSIFICATION: frozenset({"text", "text_pair", "label"}),
    DatasetSchema.TOKEN_CLASSIFICATION: frozenset({"tokens", "tags"}),
    DatasetSchema.PREFERENCE: frozenset({"prompt", "chosen", "rejected"}),
}
OPTIONAL_KEYS: dict[DatasetSchema, frozenset[str]] = {
    DatasetSchema.CHAT: frozenset({"tools", "parallel_tool_calls"}),
}
"""Keys a row of a schema may add: a chat row's function tools, as OpenAI's fine-tuning
takes them (`parallel_tool_calls` is accepted; the text trained on does not depend on it)."""
OPENAI_PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
"""OpenAI's preference rows, read as the preference schema."""
ROW_LAYOUTS: tuple[tuple[DatasetSchema, frozenset[str]], ...] = (
    *KEYS_FOR_SCHEMA.items(),
    (DatasetSchema.PREFERENCE, OPENAI_PREFERENCE_KEYS),
)
"""Each schema with the keys that make one of its rows (preference has two layouts)."""
_SCHEMA_KEYS = frozenset().union(*(keys for _, keys in ROW_LAYOUTS))
_EXPECTED_KEYS = " | ".join(", ".join(sorted(keys)) for _, keys in ROW_LAYOUTS)
_CSV_DELIMITERS = (",", "\t", ";")
_TAG = re.compile(r"^([BIESLU])-(.+)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Row = dict[str, Any]


@dataclass(frozen=True)
class ParsedDataset:
    format: DatasetFormat
    schema: DatasetSchema
    rows: list[Row]
    labels: list[str]  # sorted classes (classification) or tags (token classification)
    report: dict[str, Any]


def parse_dataset(raw: bytes, filename: str) -> ParsedDataset:
    """Validate and normalize an uploaded file; the format comes from `filename` or content."""
    text = _decode(raw)
    return _parse_text(text, detect_format(text, filename))


def load_dataset_rows(path: Path, format: str) -> list[Row]:
    """Normalized rows of a stored dataset file (validated when it was uploaded)."""
    return _parse_text(_decode(path.read_bytes()), DatasetFormat(format)).rows


def display_filename(name: str | None) -> str:
    """The last path component of a client-supplied name, printable and at most 255 chars.

    Only ever shown and used to pick a format; stored files are named by dataset id.
    """
    base = _CONTROL.sub("", (name or "").replace("\\", "/")).rsplit("/", 1)[-1].strip()
    if base in ("", ".", ".."):
        return ""
    if len(base) > 255:
        stem, ext = os.path.splitext(base)
        base = stem[: 255 - len(ext)] + ext if len(ext) <= 16 else base[:255]
    return base


def detect_format(text: str, filename: str) -> DatasetFormat:
    ext = os.path.splitext(display_filename(filename))[1].lower()
    if ext in FORMAT_FOR_EXTENSION:
        return FORMAT_FOR_EXTENSION[ext]
    first_line = next(_content_lines(text), None)
    if first_line is None:
        raise DatasetFormatError(1, "the file is empty")
    line_no, first = first_line[0], first_line[1].strip()
    if first.startswith(("{", "[")):
        return DatasetFormat.JSONL
    if _csv_delimiter(first) is not None:
        return DatasetFormat.CSV
    if len(first.split()) >= 2:
        return DatasetFormat.CONLL
    raise DatasetFormatError(
        line_no,
        "cannot tell the format: expected JSON Lines (one object per line), CSV with a "
        "text,label header, or CoNLL (a token and a tag per line)",
    )


def _decode(raw: bytes) -> str:
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DatasetFormatError(
            line, f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from exc
    nul = text.find("\x00")
    if nul >= 0:
        raise DatasetFormatError(
            text.count("\n", 0, nul) + 1,
            "NUL character: the file looks binary or UTF-16; save it as UTF-8 text",
        )
    if not text.strip():
        raise DatasetFormatError(1, "the file is empty")
    return text


def _content_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for every line that is not whitespace only."""
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line


def _csv_fields(line: str, delimiter: str = ",") -> list[str]:
    """The fields of one CSV line; none when it cannot be one (a stray carriage return)."""
    try:
        return [c.strip() for c in next(csv.reader([line], delimiter=delimiter))]
    except (csv.Error, StopIteration):
        return []


def _csv_delimiter(header: str) -> str | None:
    for delimiter in _CSV_DELIMITERS:
        if {"text", "label"} <= {c.lower() for c in _csv_fields(header, delimiter)}:
            return delimiter
    return None


class _Warnings:
    """Counts every warning and keeps the first MAX_REPORTED_WARNINGS by line."""

    def __init__(self) -> None:
        self.total = 0
        self.kinds: Counter[str] = Counter()
        self._file: list[dict[str, Any]] = []
        self._heap: list[tuple[int, int, dict[str, Any]]] = []  # (-line, -seq, warning)

    def add(self, line: int | None, kind: str, message: str) -> None:
        self.total += 1
        self.kinds[kind] += 1
        warning = {"line": line, "kind": kind, "message": message}
        if line is None:
            if len(self._file) < MAX_REPORTED_WARNINGS:
                self._file.append(warning)
            return
        heapq.heappush(self._heap, (-line, -self.total, warning))
        if len(self._heap) > MAX_REPORTED_WARNINGS:
            heapq.heappop(self._heap)

    def first(self) -> list[dict[str, Any]]:
        by_line = [w for _, _, w in sorted(self._heap, key=lambda e: (-e[0], -e[1]))]
        return (self._file + by_line)[:MAX_REPORTED_WARNINGS]


def _parse_text(text: str, fmt: DatasetFormat) -> ParsedDataset:
    warnings = _Warnings()
    batch: BatchRequestChecker | None = None
    if fmt is DatasetFormat.JSONL:
        schema, entries, batch = _parse_jsonl(text, warnings)
    elif fmt is DatasetFormat.CSV:
        schema, entries = DatasetSchema.CLASSIFICATION, _parse_csv(text, warnings)
    else:
        schema, entries = DatasetSchema.TOKEN_CLASSIFICATION, _parse_conll(text, warnings)
    counts = _check_rows(schema, entries, warnings)
    item_fields = _item_fields(entries, warnings) if schema is DatasetSchema.REINFORCEMENT else None
    report: dict[str, Any] = {
        "rows": len(entries),
        "labels": dict(sorted(counts.items())),
        "warnings": warnings.first(),
        "warnings_total": warnings.total,
        "warning_counts": dict(sorted(warnings.kinds.items())),
    }
    if batch is not None:
        report["batch"] = batch.summary()
    if item_fields is not None:
        report["item_fields"] = item_fields
    return ParsedDataset(
        format=fmt,
        schema=schema,
        rows=[row for _, row in entries],
        labels=sorted(counts),
        report=report,
    )


# --- JSON Lines ------------------------------------------------------------------------


def _layout_of_first_row(
    line: int, known: frozenset[str], keys: set[str]
) -> tuple[DatasetSchema, frozenset[str]]:
    """The schema of a file's first row, and the keys every row of the file must have."""
    for schema, required in ROW_LAYOUTS:
        if known == required:
            return schema, required
    found = ", ".join(sorted(keys)) or "none"
    for schema, required in ROW_LAYOUTS:
        if known and known < required:
            missing = ", ".join(sorted(required - known))
            raise DatasetFormatError(line, f"missing key {missing} for a {schema} row")
    raise DatasetFormatError(
        line, f"keys ({found}) do not make a dataset row; expected one of: {_EXPECTED_KEYS}"
    )


def _is_prompt_row(obj: dict[str, Any]) -> bool:
    """A row of OpenAI's reinforcement layout: messages that end with the user's turn."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return False
    last = messages[-1]
    return isinstance(last, dict) and last.get("role") == "user"


def _prompt_row(obj: dict[str, Any], line: int, first_line: int) -> Row:
    if "messages" not in obj:
        raise DatasetFormatError(
            line,
            f"missing key messages; rows of this file are reinforcement prompts since line "
            f"{first_line}",
        )
    messages = _message_list(obj["messages"], "messages", line)
    if messages[-1]["role"] != "user":
        raise DatasetFormatError(
            line,
            f"the last message is the {messages[-1]['role']}'s; a reinforcement prompt ends "
            f"with the user's (rows of this file are reinforcement prompts since line "
            f"{first_line})",
        )
    return {**obj, "messages": messages}


def _parse_jsonl(
    text: str, warnings: _Warnings
) -> tuple[DatasetSchema, list[tuple[int, Row]], BatchRequestChecker | None]:
    schema: DatasetSchema | None = None
    required: frozenset[str] = frozenset()
    batch: BatchRequestChecker | None = None
    first_line = 0
    warned_ignored = False
    entries: list[tuple[int, Row]] = []
    for line_no, line in _content_lines(text):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if schema is None and line.strip() in ("[", "{"):
                raise DatasetFormatError(
                    line_no,
                    "invalid JSON Lines: put one complete JSON object on each line "
                    "(this looks like pretty-printed JSON)",
                ) from exc
            raise DatasetFormatError(
                line_no, f"invalid JSON: {exc.msg} at column {exc.colno}"
            ) from exc
        except (ValueError, RecursionError) as exc:
            raise DatasetFormatError(line_no, f"invalid JSON: {exc}") from exc
        if isinstance(obj, list) and schema is None:
            raise DatasetFormatError(
                line_no, "found a JSON array; datasets are JSON Lines: one JSON object per line"
            )
        if not isinstance(obj, dict):
            raise DatasetFormatError(line_no, f"expected a JSON object, got {json_type(obj)}")
        keys = set(obj)
        if schema is None and looks_like_batch_request(keys):
            schema, batch = DatasetSchema.BATCH_REQUESTS, BatchRequestChecker(warnings.add)
        if batch is not None:
            entries.append((line_no, batch.check(obj, line_no)))
            continue
        if schema is None and _is_prompt_row(obj):
            schema, first_line = DatasetSchema.REINFORCEMENT, line_no
        if schema is DatasetSchema.REINFORCEMENT:
            entries.append((line_no, _prompt_row(obj, line_no, first_line)))
            continue
        known = frozenset(keys & _SCHEMA_KEYS)
        if schema is None:
            (schema, required), first_line = _layout_of_first_row(line_no, known, keys), line_no
        else:
            shape = (
                f"rows of this file are {schema} ({', '.join(sorted(required))}) "
                f"since line {first_line}"
            )
            if missing := required - known:
                raise DatasetFormatError(
                    line_no, f"missing key {', '.join(sorted(missing))}; {shape}"
                )
            if extra := known - required:
                raise DatasetFormatError(
                    line_no, f"unexpected key {', '.join(sorted(extra))}; {shape}"
                )
        ignored = keys - _SCHEMA_KEYS - OPTIONAL_KEYS.get(schema, frozenset())
        if ignored and not warned_ignored:
            warned_ignored = True
            warnings.add(
                line_no,
                "ignored_keys",
                f"keys not in the {schema} schema are ignored: " + ", ".join(sorted(ignored)[:10]),
            )
        entries.append((line_no, _normalize(schema, obj, line_no, warnings)))
    assert schema is not None  # _decode refused a file with no content lines
    return schema, entries, batch


def _string(value: Any, what: str, line: int) -> str:
    if not isinstance(value, str):
        raise DatasetFormatError(line, f"{what} must be a string, got {json_type(value)}")
    if not value.strip():
        raise DatasetFormatError(line, f"{what} is empty")
    if "\x00" in value:
        raise DatasetFormatError(line, f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DatasetFormatError(line, f"{what} contains an unpaired surrogate") from exc
    return value


def _label(value: Any, what: str, line: int) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DatasetFormatError(
            line, f"{what} must be a string or an integer, got {json_type(value)}"
        )
    return _string(value, what, line).strip()


def _string_list(value: Any, what: str, line: int) -> list[str]:
    if not isinstance(value, list):
        raise DatasetFormatError(
            line, f"{what} must be an array of strings, got {json_type(value)}"
        )
    if not value:
        raise DatasetFormatError(line, f"{what} is empty")
    return [_string(item, f"{what}[{i}]", line) for i, item in enumerate(value)]


def _normalize(schema: DatasetSchema, obj: dict[str, Any], line: int, warnings: _Warnings) -> Row:
    if schema is DatasetSchema.TEXT:
        return {"text": _string(obj["text"], "'text'", line)}
    if schema is DatasetSchema.PROMPT_COMPLETION:
        return {
            "prompt": _string(obj["prompt"], "'prompt'", line),
            "completion": _string(obj["completion"], "'completion'", line),
        }
    if schema is DatasetSchema.CLASSIFICATION:
        return {
            "text": _string(obj["text"], "'text'", line),
            "label": _label(obj["label"], "'label'", line),
        }
    if schema is DatasetSchema.PAIR_CLASSIFICATION:
        return {
            "text": _string(obj["text"], "'text'", line),
            "text_pair": _string(obj["text_pair"], "'text_pair'", line),
            "label": _label(obj["label"], "'label'", line),
        }
    if schema is DatasetSchema.TOKEN_CLASSIFICATION:
        tokens = _string_list(obj["tokens"], "'tokens'", line)
        tags = [t.strip() for t in _string_list(obj["tags"], "'tags'", line)]
        if len(tokens) != len(tags):
            raise DatasetFormatError(line, f"{len(tokens)} tokens but {len(tags)} tags")
        _check_bio(tags, [line] * len(tags), warnings)
        return {"tokens": tokens, "tags": tags}
    if schema is DatasetSchema.PREFERENCE:
        return _preference(obj, line, warnings)
    return _chat_row(obj, line, warnings)


def _message_list(
    value: Any, what: str, line: int, roles: frozenset[str] = CHAT_ROLES, calls: bool = False
) -> list[dict[str, Any]]:
    """Messages of `roles`, each with text content; with `calls`, an assistant's may make
    tool calls instead (its content then may be null) and a tool message's call id is kept."""
    if not isinstance(value, list):
        raise DatasetFormatError(line, f"'{what}' must be an array, got {json_type(value)}")
    if not value:
        raise DatasetFormatError(line, f"'{what}' is empty")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DatasetFormatError(
                line, f"{what}[{i}] must be an object, got {json_type(message)}"
            )
        if "role" not in message:
            raise DatasetFormatError(line, f"{what}[{i}] has no 'role'")
        role = _string(message["role"], f"{what}[{i}].role", line)
        if role not in roles:
            raise DatasetFormatError(
                line,
                f"{what}[{i}].role is {role!r}; expected {' or '.join(sorted(roles))}",
            )
        tool_fields = _tool_fields(message, f"{what}[{i}]", line) if calls else {}
        if message.get("content") is None and "tool_calls" in tool_fields:
            content = ""  # an assistant message that only calls tools
        elif "content" not in message:
            raise DatasetFormatError(line, f"{what}[{i}] has no 'content'")
        else:
            content = _string(message["content"], f"{what}[{i}].content", line)
        messages.append({"role": role, "content": content, **tool_fields})
    return messages


def _chat_row(obj: dict[str, Any], line: int, warnings: _Warnings) -> Row:
    """A chat row: its messages, and its function tools when it has some (an assistant
    message may then make `tool_calls`, and `tool` messages give their results back)."""
    row: Row = {"messages": _messages(obj["messages"], line, warnings)}
    if obj.get("tools") is not None:
        try:
            tools = TOOL_LIST.validate_python(obj["tools"])
        except ValidationError as exc:
            raise DatasetFormatError(line, f"tools: {_first_error(exc)}") from None
        row["tools"] = [t.model_dump(mode="json") for t in tools]
    parallel = obj.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise DatasetFormatError(line, "parallel_tool_calls must be true or false")
    return row


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{json_path(error['loc'])}: {str(error['msg']).removeprefix('Value error, ')}"


def _tool_fields(message: dict[str, Any], what: str, line: int) -> dict[str, Any]:
    """An assistant message's tool calls, a tool message's call id (OpenAI's fine-tuning
    rows with tools)."""
    fields: dict[str, Any] = {}
    if message.get("tool_calls") is not None:
        if message["role"] != "assistant":
            raise DatasetFormatError(line, f"{what}.tool_calls: only an assistant message calls")
        try:
            calls = TOOL_CALL_LIST.validate_python(message["tool_calls"])
        except ValidationError as exc:
            raise DatasetFormatError(line, f"{what}.tool_calls{_first_error(exc)}") from None
        fields["tool_calls"] = [c.model_dump(mode="json") for c in calls]
    if message.get("tool_call_id") is not None:
        fields["tool_call_id"] = _string(message["tool_call_id"], f"{what}.tool_call_id", line)
    return fields


def _messages(value: Any, line: int, warnings: _Warnings) -> list[dict[str, Any]]:
    """A chat row's messages; an assistant message may carry OpenAI's `weight`, 0 (not
    learned) or 1 (learned, as without it). Training learns the assistant's messages only."""
    messages: list[dict[str, Any]] = list(_message_list(value, "messages", line, calls=True))
    for i, given in enumerate(value):
        if "weight" not in given:
            continue
        weight = given["weight"]
        if messages[i]["role"] != "assistant":
            raise DatasetFormatError(
                line, f"messages[{i}] has a weight; only assistant messages take one"
            )
        if isinstance(weight, bool) or weight not in (0, 1):
            raise DatasetFormatError(line, f"messages[{i}].weight is {weight!r}; expected 0 or 1")
        messages[i] = {**messages[i], "weight": int(weight)}
    if not any(learned(m) for m in messages):
        warnings.add(line, "no_assistant", "no assistant message to learn: nothing to learn from")
    return messages


_ASSISTANT = frozenset({"assistant"})


def _preference(obj: dict[str, Any], line: int, warnings: _Warnings) -> Row:
    """OpenAI's layout as message lists; TRL's as three texts or three message lists."""
    if "input" in obj:
        given = obj["input"]
        if not isinstance(given, dict) or "messages" not in given:
            raise DatasetFormatError(
                line, f"'input' must be an object with 'messages', got {json_type(given)}"
            )
        row: Row = {
            "prompt": _message_list(given["messages"], "input.messages", line),
            "chosen": _message_list(obj["preferred_output"], "preferred_output", line, _ASSISTANT),
            "rejected": _message_list(
                obj["non_preferred_output"], "non_preferred_output", line, _ASSISTANT
            ),
        }
    elif isinstance(obj["prompt"], list):
        row = {
            "prompt": _message_list(obj["prompt"], "prompt", line),
            "chosen": _message_list(obj["chosen"], "chosen", line, _ASSISTANT),
            "rejected": _message_list(obj["rejected"], "rejected", line, _ASSISTANT),
        }
    else:
        prompt = _string(obj["prompt"], "'prompt'", line)
        for key in ("chosen", "rejected"):
            if isinstance(obj[key], list):
                raise DatasetFormatError(
                    line,
                    f"'{key}' is an array of messages but 'prompt' is a string: give three "
                    "strings, or three arrays of messages",
                )
        row = {
            "prompt": prompt,
            "chosen": _string(obj["chosen"], "'chosen'", line),
            "rejected": _string(obj["rejected"], "'rejected'", line),
        }
    if row["chosen"] == row["rejected"]:
        warnings.add(
            line, "same_answers", "the chosen and rejected answers are the same: nothing to learn"
        )
    return row


def _item_fields(entries: list[tuple[int, Row]], warnings: _Warnings) -> list[str]:
    """The fields besides `messages` that every row has (what a grader may name as
    `{{item.<field>}}`); a warning for each field some rows lack."""
    counts: Counter[str] = Counter()
    first_without: dict[str, int] = {}
    for _, row in entries:
        counts.update(key for key in row if key != "messages")
    for line, row in entries:
        for key in counts:
            if key not in row:
                first_without.setdefault(key, line)
    for key, line in sorted(first_without.items()):
        warnings.add(
            line,
            "missing_field",
            f"{len(entries) - counts[key]} rows lack field {key!r} (the first here): a grader "
            f"cannot name {{{{item.{key}}}}}",
        )
    return sorted(key for key in counts if key not in first_without)


# --- CSV -------------------------------------------------------------------------------


def _parse_csv(text: str, warnings: _Warnings) -> list[tuple[int, Row]]:
    header_line, header = next(_content_lines(text))
    delimiter = _csv_delimiter(header.strip())
    if delimiter is None:
        found = ", ".join(_csv_fields(header.strip())) or "nothing"
        raise DatasetFormatError(
            header_line,
            f"CSV needs a header row naming a text and a label column (found: {found[:200]})",
        )
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    columns: list[str] | None = None
    text_at = label_at = 0
    entries: list[tuple[int, Row]] = []
    end = 0
    while True:
        start = end + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DatasetFormatError(start, f"CSV: {exc}") from exc
        end = reader.line_num
        if not any(field.strip() for field in record):
            continue
        if columns is None:
            columns = [c.strip().lower() for c in record]
            text_at, label_at = columns.index("text"), columns.index("label")
            ignored = [c for c in columns if c not in ("text", "label")]
            if ignored:
                warnings.add(
                    start, "ignored_columns", "columns ignored: " + ", ".join(ignored[:10])
                )
            continue
        if len(record) != len(columns):
            hint = (
                f" (quote fields that contain {delimiter!r})" if len(record) > len(columns) else ""
            )
            raise DatasetFormatError(
                start, f"{len(record)} fields but the header has {len(columns)}{hint}"
            )
        entries.append(
            (
                start,
                {
                    "text": _string(record[text_at], "text", start),
                    "label": _string(record[label_at], "label", start).strip(),
                },
            )
        )
    if not entries:
        raise DatasetFormatError(header_line, "no rows after the header")
    return entries


# --- CoNLL / BIO -----------------------------------------------------------------------


def _parse_conll(text: str, warnings: _Warnings) -> list[tuple[int, Row]]:
    """A token and a tag per line (tag last, extra columns between are ignored);
    sentences end at any whitespace-only line; -DOCSTART- lines separate documents."""
    entries: list[tuple[int, Row]] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []

    def close() -> None:
        if tokens:
            _check_bio(tags, lines, warnings)
            entries.append((lines[0], {"tokens": list(tokens), "tags": list(tags)}))
            tokens.clear()
            tags.clear()
            lines.clear()

    for line_no, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("-DOCSTART-"):
            close()
            continue
        parts = stripped.split("\t") if "\t" in stripped else stripped.split()
        parts = [p.strip() for p in parts if p.strip()]
        if len(parts) < 2:
            raise DatasetFormatError(
                line_no,
                f"expected a token and a tag separated by a tab or spaces, got {stripped[:40]!r}",
            )
        tokens.append(parts[0])
        tags.append(parts[-1])
        lines.append(line_no)
    close()
    if not entries:
        raise DatasetFormatError(1, "no sentences (only -DOCSTART- lines)")
    return entries


def _check_bio(tags: list[str], lines: list[int], warnings: _Warnings) -> None:
    """Warn about tags that are not BIO and about I- tags that continue nothing."""
    previous: tuple[str, str] | None = None  # (prefix, type) of an entity tag just before
    previous_tag: str | None = None
    for tag, line in zip(tags, lines, strict=True):
        match = _TAG.match(tag)
        if tag != "O" and match is None:
            warnings.add(line, "bio", f"tag {tag!r} is not a BIO tag (O, B-type, I-type)")
        if match is None:
            previous, previous_tag = None, tag
            continue
        prefix, type_ = match.group(1), match.group(2)
        if prefix in "IEL" and (
            previous is None or previous[0] not in "BI" or previous[1] != type_
        ):
            warnings.add(
                line,
                "bio",
                f"{tag} follows {previous_tag or 'the sentence start'}; "
                f"BIO expects B-{type_} to open an entity",
            )
        previous, previous_tag = (prefix, type_), tag


# --- checks over all rows --------------------------------------------------------------


def _row_chars(schema: DatasetSchema, row: Row) -> int:
    if schema is DatasetSchema.PROMPT_COMPLETION:
        return len(row["prompt"]) + len(row["completion"])
    if schema is DatasetSchema.CHAT:
        return sum(len(m["content"]) for m in row["messages"])
    if schema is DatasetSchema.TOKEN_CLASSIFICATION:
        return sum(len(t) + 1 for t in row["tokens"])
    if schema is DatasetSchema.PAIR_CLASSIFICATION:
        return len(row["text"]) + len(row["text_pair"])
    if schema is DatasetSchema.PREFERENCE:
        return sum(_text_chars(row[key]) for key in ("prompt", "chosen", "rejected"))
    if schema is DatasetSchema.REINFORCEMENT:
        return _text_chars(row["messages"])
    return len(row["text"])


def _text_chars(value: str | list[dict[str, str]]) -> int:
    """Characters of a text, or of a list of messages' contents."""
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)


def _digest(value: Any) -> bytes:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).digest()


def _check_rows(
    schema: DatasetSchema, entries: list[tuple[int, Row]], warnings: _Warnings
) -> Counter[str]:
    """Duplicates, conflicting labels, very long rows; returns label (or tag) counts."""
    if schema is DatasetSchema.BATCH_REQUESTS:
        return Counter()  # BatchRequestChecker checked them line by line
    seen: dict[bytes, int] = {}
    texts: dict[bytes, tuple[int, str]] = {}
    counts: Counter[str] = Counter()
    for line, row in entries:
        key = _digest(row)
        if key in seen:
            warnings.add(line, "duplicate", f"same row as line {seen[key]}")
        else:
            seen[key] = line
        chars = _row_chars(schema, row)
        if chars > LONG_ROW_CHARS:
            warnings.add(
                line,
                "long_row",
                f"{chars} characters (over {LONG_ROW_CHARS}); it will be truncated to max_length",
            )
        if schema in LABELLED_SCHEMAS:
            counts[row["label"]] += 1
            text_key = _digest([row["text"], row.get("text_pair")])
            first = texts.setdefault(text_key, (line, row["label"]))
            if first[1] != row["label"]:
                warnings.add(
                    line,
                    "conflicting_label",
                    f"same text as line {first[0]} with another label "
                    f"({row['label']!r}, not {first[1]!r})",
                )
        elif schema is DatasetSchema.TOKEN_CLASSIFICATION:
            counts.update(row["tags"])
    if schema in LABELLED_SCHEMAS and len(counts) == 1:
        (label,) = counts
        warnings.add(
            None,
            "single_class",
            f"every row has label {label!r}; a classifier needs at least two labels",
        )
    if schema is DatasetSchema.TOKEN_CLASSIFICATION and len(counts) == 1:
        (tag,) = counts
        warnings.add(None, "single_class", f"every token has tag {tag!r}; nothing to tell apart")
    return counts
