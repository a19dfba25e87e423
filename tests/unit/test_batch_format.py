"""OpenAI batch files: request-line validation at upload, conversion to GenerateSpec,
output and error lines, and the BatchSpec's completion window."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from core.batch import MAX_BATCH_LINES
from core.datasets import load_dataset_rows, parse_dataset
from core.enums import SCHEMAS_FOR_TASK, BatchEndpoint, DatasetSchema
from core.errors import BatchLineError, DatasetFormatError
from core.specs import BatchSpec
from db.outputs import OutputRecord, storable_text
from workers.batch.lines import (
    EXPIRED_CODE,
    error_line,
    generate_spec_for,
    output_line,
    stored_error,
    stored_output,
)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
DEFAULT_MAX = 1024  # the settings' chat_default_max_tokens


def completion(custom_id: str = "r1", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": COMPLETIONS,
        "body": {"model": "tiny-gpt2", "prompt": "The blue mug", **body},
    }


def chat(custom_id: str = "c1", **body: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": "tiny-gpt2", "messages": messages, **body},
    }


def jsonl(*rows: Any) -> bytes:
    return ("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n").encode()


def refused(raw: bytes) -> str:
    with pytest.raises(DatasetFormatError) as info:
        parse_dataset(raw, "batch.jsonl")
    return str(info.value)


# --- upload: detection and what is accepted ------------------------------------------------


def test_request_lines_are_a_batch_dataset_with_a_summary(tmp_path: Any) -> None:
    raw = jsonl(completion("a"), completion("b", model="other", max_tokens=5, stop=["\n"]))
    parsed = parse_dataset(raw, "requests.jsonl")
    assert parsed.schema is DatasetSchema.BATCH_REQUESTS
    assert [r["custom_id"] for r in parsed.rows] == ["a", "b"]
    assert parsed.rows[1]["body"]["max_tokens"] == 5
    assert parsed.labels == []
    assert parsed.report["batch"] == {
        "endpoint": COMPLETIONS,
        "models": ["other", "tiny-gpt2"],
        "requests": 2,
    }
    stored = tmp_path / "data.jsonl"
    stored.write_bytes(raw)
    assert load_dataset_rows(stored, "jsonl") == parsed.rows


def test_chat_lines_and_warnings_for_fields_this_server_ignores_or_lacks() -> None:
    raw = jsonl(
        {**chat("a", user="u-1", frequency_penalty=0), "extra": 1},
        chat("b", logprobs=True, echo=False, functions=[{"name": "f"}], stream=False),
    )
    parsed = parse_dataset(raw, "x.jsonl")
    assert parsed.schema is DatasetSchema.BATCH_REQUESTS
    assert parsed.report["batch"]["endpoint"] == CHAT
    kinds = {w["kind"]: w["line"] for w in parsed.report["warnings"]}
    assert kinds == {"ignored_keys": 1, "unsupported_parameters": 2}


def test_a_batch_file_cannot_train_anything() -> None:
    assert all(DatasetSchema.BATCH_REQUESTS not in s for s in SCHEMAS_FOR_TASK.values())


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([completion("a"), completion("a")], "line 2: custom_id 'a' is already used on line 1"),
        ([completion(" ")], "line 1: custom_id is empty"),
        ([{**completion(), "custom_id": 7}], "line 1: custom_id must be a string, got a number"),
        ([{**completion(), "method": "GET"}], "line 1: method is 'GET'; batch requests use POST"),
        ([{**completion(), "url": "/v1/embeddings"}], "line 1: url is '/v1/embeddings'"),
        ([completion("a"), chat("b")], "line 2: url is /v1/chat/completions but line 1 uses"),
        ([{k: v for k, v in completion().items() if k != "body"}], "line 1: missing key body"),
        ([{**completion(), "body": []}], "line 1: body must be an object, got an array"),
        ([{**completion(), "body": {"prompt": "x"}}], "line 1: body.model is missing"),
        ([completion(model="")], "line 1: body.model is empty"),
        ([completion(prompt=["a", "b"])], "line 1: body.prompt must be a string, got an array"),
        ([{**completion(), "body": {"model": "m", "messages": []}}], "(messages belong to"),
        ([chat(messages="hi")], "line 1: body.messages must be an array, got a string"),
        ([chat(messages=[])], "line 1: body.messages is empty"),
        ([chat(messages=[{"role": "user"}])], "line 1: body.messages[0] has no 'content'"),
        ([chat(messages=[{"role": "bot", "content": "x"}])], "body.messages[0].role is 'bot'"),
        ([chat(messages=[{"role": "user", "content": 1}])], "messages[0].content must be a string"),
        ([completion(logit_bias=[1])], "line 1: body.logit_bias must be an object, got an array"),
        ([completion(logit_bias={"a": 1})], "line 1: body.logit_bias key 'a' is not a token id"),
        (
            [completion(logit_bias={"5": 101})],
            "body.logit_bias['5'] is 101; it must be at most 100",
        ),
        (
            [chat(messages=[{"role": "user", "content": "x", "name": 1}])],
            "body.messages[0].name must be a string of at most 64 characters",
        ),
        ([completion(temperature=2.5)], "line 1: body.temperature is 2.5; it must be at most 2"),
        ([completion(top_p=-0.1)], "line 1: body.top_p is -0.1; it must be at least 0"),
        ([completion(max_tokens=0)], "line 1: body.max_tokens is 0; it must be at least 1"),
        ([completion(max_tokens=2.5)], "line 1: body.max_tokens must be an integer"),
        ([completion(n=129)], "line 1: body.n is 129; it must be at most 128"),
        ([completion(seed="1")], "line 1: body.seed must be a number, got a string"),
        ([completion(temperature=True)], "line 1: body.temperature must be a number"),
        ([completion(stop=[""])], "line 1: body.stop[0] is empty"),
        ([completion(stop=3)], "line 1: body.stop must be a string or an array of strings"),
        ([completion(stream=True)], "line 1: body.stream is true"),
        ([completion("a"), '{"text": "not a request"}'], "line 2: missing key custom_id"),
    ],
)
def test_broken_request_lines_are_refused_with_their_line(rows: list[Any], expected: str) -> None:
    assert expected in refused(jsonl(*rows))


def test_a_broken_line_deep_in_the_file_is_named() -> None:
    rows = [completion(f"r{i}") for i in range(5)] + [completion("r5", n=0)]
    assert refused(jsonl(*rows)).startswith("line 6: body.n is 0")


def test_too_many_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("core.batch.MAX_BATCH_LINES", 3)
    rows = [completion(f"r{i}") for i in range(4)]
    assert refused(jsonl(*rows)) == "line 4: a batch holds at most 3 requests"
    assert MAX_BATCH_LINES == 50_000


def test_text_rows_with_a_url_key_are_still_text() -> None:
    parsed = parse_dataset(jsonl({"text": "hello", "url": "http://x", "body": "b"}), "t.jsonl")
    assert parsed.schema is DatasetSchema.TEXT


# --- conversion to GenerateSpec ---------------------------------------------------------


def test_completion_line_maps_openai_names() -> None:
    spec = generate_spec_for(
        completion(max_tokens=7, n=2, temperature=0.5, top_p=0.9, seed=3, stop="\n", top_k=-1),
        DEFAULT_MAX,
    )
    assert spec.prompts == ["The blue mug"]
    assert spec.messages is None
    assert (spec.max_new_tokens, spec.num_return_sequences) == (7, 2)
    assert (spec.temperature, spec.top_p, spec.seed, spec.top_k) == (0.5, 0.9, 3, 0)
    assert spec.stop == ["\n"]


def test_completion_default_max_tokens_is_openais() -> None:
    assert generate_spec_for(completion(), DEFAULT_MAX).max_new_tokens == 16


def test_a_chat_line_without_max_tokens_gets_what_the_context_leaves() -> None:
    """As /v1/chat/completions: the default, cut to the context; a line's own limit stays."""
    spec = generate_spec_for(chat(), DEFAULT_MAX)
    assert (spec.max_new_tokens, spec.fit_max_new_tokens) == (DEFAULT_MAX, True)
    spec = generate_spec_for(chat(max_tokens=5), DEFAULT_MAX)
    assert (spec.max_new_tokens, spec.fit_max_new_tokens) == (5, False)
    assert not generate_spec_for(completion(), DEFAULT_MAX).fit_max_new_tokens


def test_chat_line_becomes_one_conversation() -> None:
    line = chat(max_tokens=5, max_completion_tokens=9, stop=["a", "b"])
    line["body"]["messages"][0]["role"] = "developer"
    spec = generate_spec_for(line, DEFAULT_MAX)
    assert spec.prompts is None
    assert spec.messages is not None and len(spec.messages) == 1
    assert [(m.role, m.content) for m in spec.messages[0]] == [
        ("system", "Be brief."),
        ("user", "Hi"),
    ]
    assert spec.max_new_tokens == 9
    assert spec.stop == ["a", "b"]
    assert spec.uses_chat_template


def test_a_lines_logit_bias_reaches_the_spec() -> None:
    spec = generate_spec_for(completion(logit_bias={"5": -100, "9": 1.5}), DEFAULT_MAX)
    assert spec.logit_bias == {5: -100.0, 9: 1.5}


def test_a_chat_lines_message_names_reach_the_spec() -> None:
    line = chat()
    line["body"]["messages"][1]["name"] = "ada"
    spec = generate_spec_for(line, DEFAULT_MAX)
    assert spec.messages is not None
    assert [m.name for m in spec.messages[0]] == [None, "ada"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (completion(n=3, temperature=0), "num_return_sequences > 1 needs temperature > 0"),
        (completion(n=17), "body.n: Input should be less than or equal to 16"),
        (completion(max_tokens=5000), "body.max_tokens: Input should be less than or equal"),
        (completion(top_p=0), "body.top_p: Input should be greater than 0"),
        (completion(seed=2**63), "body.seed: Input should be less than or equal to"),
        (completion(stop=["x"] * 9), "body.stop: List should have at most 8 items"),
        (completion(prompt="   "), "prompt 0 is blank"),
        (completion(model="../etc"), "body.model:"),
        (completion(top_logprobs=2), "unsupported parameter: top_logprobs"),
        (chat(logprobs=True, top_logprobs=21), "body.top_logprobs: Input should be less than"),
        (chat(messages=[{"role": "robot", "content": "x"}]), "body.messages[0].role:"),
        (chat(messages=[{"role": "tool", "content": "x"}]), "needs a tool_call_id"),
    ],
)
def test_values_this_server_cannot_run_are_the_lines_error(
    line: dict[str, Any], expected: str
) -> None:
    with pytest.raises(BatchLineError) as info:
        generate_spec_for(line, DEFAULT_MAX)
    assert expected in info.value.message
    assert info.value.type == "invalid_request"


def test_logprobs_map_onto_the_spec() -> None:
    spec = generate_spec_for(chat(logprobs=True, top_logprobs=4), DEFAULT_MAX)
    assert (spec.logprobs, spec.top_logprobs) == (True, 4)
    spec = generate_spec_for(completion(logprobs=0), DEFAULT_MAX)
    assert (spec.logprobs, spec.top_logprobs) == (True, 0)
    assert not generate_spec_for(chat(), DEFAULT_MAX).logprobs


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (completion(logprobs=6), "body.logprobs is 6; it must be at most 5"),
        (completion(logprobs=True), "body.logprobs must be a number"),
        (completion(top_logprobs=1), "body.top_logprobs is a chat parameter"),
        (chat(logprobs=2), "body.logprobs must be a boolean"),
        (chat(logprobs=True, top_logprobs=21), "body.top_logprobs is 21; it must be at most 20"),
        (chat(top_logprobs=3), "body.top_logprobs needs body.logprobs: true"),
    ],
)
def test_logprobs_outside_openais_ranges_refuse_the_file(
    line: dict[str, Any], expected: str
) -> None:
    assert expected in refused(jsonl(line))


def test_output_lines_carry_logprobs() -> None:
    entry = {"token": "a", "logprob": -0.25, "bytes": [97], "top_logprobs": []}
    record = OutputRecord(0, 0, "a", "length", 4, 1, data={"logprobs": [entry]})
    body = output_line(chat("c", logprobs=True), [record])["response"]["body"]
    assert body["choices"][0]["logprobs"] == {"content": [entry], "refusal": None}
    body = output_line(completion("r", logprobs=0), [record])["response"]["body"]
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["a"],
        "token_logprobs": [-0.25],
        "top_logprobs": [{"a": -0.25}],
        "text_offset": [0],
    }


# --- output and error lines -------------------------------------------------------------


def texts(*items: tuple[int, str, str, int]) -> list[OutputRecord]:
    return [OutputRecord(0, seq, text, reason, 4, n) for seq, text, reason, n in items]


def test_completion_output_line() -> None:
    line = output_line(
        completion("r9"), texts((1, "second", "length", 3), (0, "first", "stop", 2)), created=7
    )
    assert line["id"].startswith("batch_req_") and line["custom_id"] == "r9"
    assert line["error"] is None
    response = line["response"]
    assert response["status_code"] == 200 and response["request_id"]
    body = response["body"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert (body["created"], body["model"]) == (7, "tiny-gpt2")
    assert body["choices"] == [
        {"index": 0, "text": "first", "logprobs": None, "finish_reason": "stop"},
        {"index": 1, "text": "second", "logprobs": None, "finish_reason": "length"},
    ]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}


def test_a_nul_a_model_emitted_reads_as_the_stored_text_does() -> None:
    """PostgreSQL text holds no NUL, so stored texts swap it for U+FFFD; the line's body
    (stored as JSON beside it) says the same, not the raw NUL."""
    body = output_line(chat("c"), texts((0, "\x00[ it", "length", 3)))["response"]["body"]
    assert body["choices"][0]["message"]["content"] == "\ufffd[ it" == storable_text("\x00[ it")


def test_chat_output_line() -> None:
    body = output_line(chat("c"), texts((0, "Hello!", "stop", 2)))["response"]["body"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]


def test_stored_rows_hold_the_line() -> None:
    row = stored_output(3, completion("r3"), texts((0, "a", "stop", 1), (1, "b", "length", 2)))
    assert (row.prompt_index, row.sequence_index, row.text, row.completion_tokens) == (3, 0, "a", 3)
    assert row.data is not None and row.data["custom_id"] == "r3"
    failed = stored_error(4, "r4", EXPIRED_CODE, "too late")
    assert (failed.prompt_index, failed.text, failed.finish_reason) == (4, "", "error")
    assert failed.data is not None
    assert failed.data["response"] is None
    assert failed.data["error"] == {"code": "batch_expired", "message": "too late"}
    assert error_line("x", "c", "m")["id"] != error_line("x", "c", "m")["id"]


# --- BatchSpec -------------------------------------------------------------------------

DS = "ds_" + "0" * 32


@pytest.mark.parametrize(
    ("window", "delta"),
    [("24h", timedelta(hours=24)), ("5s", timedelta(seconds=5)), ("168h", timedelta(days=7))],
)
def test_completion_window(window: str, delta: timedelta) -> None:
    spec = BatchSpec(input_dataset=DS, endpoint=BatchEndpoint.COMPLETIONS, completion_window=window)
    assert spec.window == delta


@pytest.mark.parametrize("window", ["0s", "169h", "10081m", "1d", "24", "h", "-1h", "1.5h"])
def test_bad_completion_windows(window: str) -> None:
    with pytest.raises(ValidationError):
        BatchSpec.model_validate(
            {"input_dataset": DS, "endpoint": COMPLETIONS, "completion_window": window}
        )


def test_spec_defaults_and_refusals() -> None:
    spec = BatchSpec.model_validate({"input_dataset": DS, "endpoint": CHAT})
    assert spec.completion_window == "24h"
    assert spec.endpoint is BatchEndpoint.CHAT_COMPLETIONS
    for bad in ({"endpoint": "/v1/embeddings"}, {"input_dataset": "x"}, {"model": "m"}):
        with pytest.raises(ValidationError):
            BatchSpec.model_validate({"input_dataset": DS, "endpoint": CHAT, **bad})


def test_frequency_and_presence_penalties_are_mapped() -> None:
    spec = generate_spec_for(completion(frequency_penalty=0.5, presence_penalty=-1.25), DEFAULT_MAX)
    assert (spec.frequency_penalty, spec.presence_penalty) == (0.5, -1.25)
    assert "body.presence_penalty is 2.5" in refused(jsonl(completion(presence_penalty=2.5)))


def test_response_format_is_mapped_and_an_unenforceable_schema_is_the_lines_error() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    rf = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    spec = generate_spec_for(chat(response_format=rf), DEFAULT_MAX)
    assert spec.response_format is not None
    assert spec.response_format.model_dump(mode="json")["json_schema"]["schema"] == schema
    assert generate_spec_for(
        chat(response_format={"type": "json_object"}), DEFAULT_MAX
    ).response_format
    parsed = parse_dataset(jsonl(chat("a", response_format=rf)), "x.jsonl")
    assert parsed.report["warnings"] == []
    bad = {"type": "json_schema", "json_schema": {"name": "o", "schema": {"not": {}}}}
    with pytest.raises(BatchLineError, match="'not' is not supported"):
        generate_spec_for(chat(response_format=bad), DEFAULT_MAX)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_a_chat_line_forces_a_tool_call_and_answers_it_as_tool_calls() -> None:
    line = chat("t", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    spec = generate_spec_for(line, DEFAULT_MAX)
    assert spec.calls_tools and spec.parallel_tool_calls is False
    text = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    record = OutputRecord(0, 0, text, "stop", 5, 9, None)
    [choice] = output_line(line, [record])["response"]["body"]["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    # a call cut short is answered as its text
    cut = OutputRecord(0, 0, text[:20], "length", 5, 9, None)
    [choice] = output_line(line, [cut])["response"]["body"]["choices"]
    assert (choice["message"]["content"], choice["finish_reason"]) == (text[:20], "length")
    # the calls given back in a later line's conversation reach its spec
    given_back = chat(
        "u",
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", **call}]},
            {"role": "tool", "content": "12 C", "tool_call_id": "call_1"},
        ],
    )
    assert parse_dataset(jsonl(given_back), "x.jsonl").schema is DatasetSchema.BATCH_REQUESTS
    [conversation] = generate_spec_for(given_back, DEFAULT_MAX).messages or []
    assert conversation[2].tool_call_id == "call_1"


def test_a_chat_line_with_tools_and_no_choice_is_auto() -> None:
    line = chat("a", tools=[WEATHER])
    assert parse_dataset(jsonl(line), "x.jsonl").report["warnings"] == []
    assert generate_spec_for(line, DEFAULT_MAX).tool_choice == "auto"
    with pytest.raises(DatasetFormatError, match=r"body\.tools must be an array"):
        parse_dataset(jsonl(chat("b", tools={"x": 1})), "x.jsonl")
