"""OpenAI chat/completion bodies as generation job requests: what is honoured, what is
accepted because it asks for nothing, and what is refused by name."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion_choice import Logprobs

from api.serving_requests import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionBody,
    body_schema,
    chat_request,
    completion_request,
    openai_param,
)
from core.completions import choice_logprobs, chunk_object, completion_object, echoed, usage
from core.errors import BadRequestError, UnsupportedParameterError
from db.outputs import OutputRecord

MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(**body: Any) -> Any:
    return chat_request({"model": "m", "messages": MESSAGES, **body}, default_max_tokens=100)


def test_chat_body_maps_onto_the_spec() -> None:
    req = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
            },
        ],
        max_completion_tokens=9,
        max_tokens=50,
        temperature=0.5,
        top_p=0.9,
        n=3,
        stop="END",
        seed=4,
        top_k=-1,
        user="u-1",
        metadata={"team": "support"},
        stream=True,
        stream_options={"include_usage": True},
    )
    spec = req.job.spec
    assert spec.messages is not None
    assert [(m.role, m.content) for m in spec.messages[0]] == [
        ("system", "Be brief."),
        ("user", "Hi there"),
    ]
    assert (spec.max_new_tokens, spec.temperature, spec.top_p) == (9, 0.5, 0.9)
    assert (spec.num_return_sequences, spec.stop, spec.seed, spec.top_k) == (3, ["END"], 4, 0)
    assert req.job.metadata == {"team": "support", "user": "u-1"}
    assert (req.stream, req.include_usage, req.prompts, req.choices_per_prompt) == (
        True,
        True,
        1,
        3,
    )


def test_a_messages_name_reaches_the_spec_and_an_unset_one_is_not_stored() -> None:
    """OpenAI's `name` tells participants of one role apart; it goes to the chat template
    (a message without one has no `name` key there, nor in the stored spec)."""
    req = chat(
        messages=[
            {"role": "user", "content": "Hi", "name": "ada"},
            {"role": "user", "content": "Hello", "name": ""},
            {"role": "assistant", "content": "Hey"},
        ]
    )
    spec = req.job.spec
    assert spec.messages is not None
    assert [m.name for m in spec.messages[0]] == ["ada", None, None]
    stored = spec.model_dump(mode="json")["messages"][0]
    assert stored == [
        {"role": "user", "content": "Hi", "name": "ada"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hey"},
    ]


def test_logit_bias_and_any_64_bit_seed_reach_the_spec() -> None:
    spec = chat(logit_bias={"50": -100, "7": 2.5}, seed=-1).job.spec
    assert spec.logit_bias == {50: -100.0, 7: 2.5}
    assert spec.seed == -1
    text = completion_request({"model": "m", "prompt": "p", "logit_bias": {"3": 1}}).job.spec
    assert text.logit_bias == {3: 1.0}
    assert "logit_bias" not in chat().job.spec.model_dump(mode="json")  # none: not stored


def test_completion_prompts_may_be_token_ids() -> None:
    """As OpenAI's: one list of token ids, or a list of such lists (fed as given)."""
    one = completion_request({"model": "m", "prompt": [5, 6, 7]})
    assert (one.job.spec.prompt_token_ids, one.job.spec.prompts, one.prompts) == (
        [[5, 6, 7]],
        None,
        1,
    )
    two = completion_request({"model": "m", "prompt": [[5], [6, 7]], "n": 2, "temperature": 1})
    assert (two.job.spec.prompt_token_ids, two.prompts) == ([[5], [6, 7]], 2)
    for prompt, param in (([[5], []], "prompt[1]"), ([5, "x"], "prompt"), ([[-1]], "prompt[0][0]")):
        with pytest.raises(BadRequestError) as refused:
            completion_request({"model": "m", "prompt": prompt})
        assert refused.value.param == param


def test_echo_asks_for_the_prompts_entries_where_the_answer_needs_them() -> None:
    """With logprobs the prompt's entries are answered; a prompt of token ids needs them
    for its text; a text prompt without logprobs is echoed from the request alone."""
    with_logprobs = completion_request({"model": "m", "prompt": "p", "echo": True, "logprobs": 2})
    assert with_logprobs.echo and with_logprobs.job.spec.prompt_logprobs == 2
    ids = completion_request({"model": "m", "prompt": [5, 6], "echo": True})
    assert ids.job.spec.prompt_logprobs == 0
    text = completion_request({"model": "m", "prompt": "p", "echo": True})
    assert text.echo and text.job.spec.prompt_logprobs is None
    assert not completion_request({"model": "m", "prompt": "p", "echo": False}).echo
    for body in ({"stream": True}, {"store": False}):
        with pytest.raises(BadRequestError) as refused:
            completion_request({"model": "m", "prompt": "p", "echo": True, **body})
        assert refused.value.param == "echo"
    scored = completion_request({"model": "m", "prompt": "p", "echo": True, "max_tokens": 0})
    assert (scored.job.spec.max_new_tokens, scored.job.spec.prompt_logprobs) == (0, 0)
    with pytest.raises(BadRequestError) as nothing:
        completion_request({"model": "m", "prompt": "p", "max_tokens": 0})
    assert nothing.value.param == "max_tokens"
    with pytest.raises(BadRequestError) as chat_zero:
        chat(max_tokens=0)
    assert chat_zero.value.param == "max_tokens"
    with pytest.raises(UnsupportedParameterError) as unknown:
        chat(echo=True)  # chat has no echo
    assert unknown.value.param == "echo"


def test_an_echoed_completion_has_its_prompt_first_with_null_first_logprob() -> None:
    def entry(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": None, "top_logprobs": []}

    data = {
        "prompt_logprobs": [entry("Hi", None), entry(" there", -1.5)],
        "logprobs": [entry("!", -0.25)],
    }
    text, echoed_data = echoed("!", data, "Hi there")
    assert text == "Hi there!"
    legacy = choice_logprobs(False, logprob_entries_of(echoed_data))
    assert legacy == {
        "tokens": ["Hi", " there", "!"],
        "token_logprobs": [None, -1.5, -0.25],
        "top_logprobs": [None, {" there": -1.5}, {"!": -0.25}],
        "text_offset": [0, 2, 8],
    }
    assert echoed("!", {"prompt_logprobs": data["prompt_logprobs"]}, None)[0] == "Hi there!"
    assert echoed("!", None, "Hi")[0] == "Hi!"


def logprob_entries_of(data: dict[str, Any] | None) -> list[dict[str, Any]]:
    assert data is not None
    found: list[dict[str, Any]] = data["logprobs"]
    return found


def test_store_decides_whether_the_text_is_kept() -> None:
    assert chat().job.spec.store_text is True
    assert chat(store=False).job.spec.store_text is False
    not_by_default = chat_request({"model": "m", "messages": MESSAGES}, 10, store_text=False)
    assert not_by_default.job.spec.store_text is False
    assert chat_request(
        {"model": "m", "messages": MESSAGES, "store": True}, 10, store_text=False
    ).job.spec.store_text


def test_penalties_and_response_format_reach_the_spec() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    spec = chat(
        frequency_penalty=0.5,
        presence_penalty=-1,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    ).job.spec
    assert (spec.frequency_penalty, spec.presence_penalty) == (0.5, -1.0)
    assert spec.response_format is not None
    assert spec.response_format.model_dump(by_alias=True)["json_schema"]["schema"] == schema


def test_a_schema_decoding_cannot_enforce_is_a_400_naming_where() -> None:
    schema = {"type": "object", "patternProperties": {"^a": {"type": "string"}}}
    with pytest.raises(BadRequestError) as refused:
        chat(
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
        )
    assert refused.value.param is not None
    assert refused.value.param.startswith("response_format.json_schema")
    assert "patternProperties" in refused.value.message


def test_defaults_are_openais() -> None:
    assert chat().job.spec.max_new_tokens == 100
    req = completion_request({"model": "m", "prompt": ["a", "b"]})
    assert req.job.spec.max_new_tokens == COMPLETIONS_DEFAULT_MAX_TOKENS
    assert (req.prompts, req.choices_per_prompt, req.chat) == (2, 1, False)
    # chat's default is what the context leaves (up to the server's default), completions' 16
    assert chat().job.spec.fit_max_new_tokens
    assert not chat(max_tokens=5).job.spec.fit_max_new_tokens
    assert not req.job.spec.fit_max_new_tokens


@pytest.mark.parametrize(
    "body",
    [
        {"logprobs": False},
        {"tools": []},
        {"parallel_tool_calls": True},
        {"service_tier": "auto"},
    ],
)
def test_no_op_values_of_unsupported_parameters_are_accepted(body: dict[str, Any]) -> None:
    chat(**body)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"beam_width": 2}, "beam_width"),
    ],
)
def test_parameters_that_would_be_ignored_are_refused_by_name(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(UnsupportedParameterError) as refused:
        chat(**body)
    assert refused.value.param == param


def test_completions_refuse_their_own_unsupported_parameters() -> None:
    for body, param in (
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
    ):
        with pytest.raises(UnsupportedParameterError) as refused:
            completion_request({"model": "m", "prompt": "p", **body})
        assert refused.value.param == param
    with pytest.raises(UnsupportedParameterError) as refused:
        completion_request({"model": "m", "prompt": "p", "top_logprobs": 2})  # chat's
    assert refused.value.param == "top_logprobs"


def test_chat_logprobs_map_onto_the_spec() -> None:
    spec = chat(logprobs=True, top_logprobs=3).job.spec
    assert (spec.logprobs, spec.top_logprobs) == (True, 3)
    spec = chat(logprobs=True).job.spec
    assert (spec.logprobs, spec.top_logprobs) == (True, 0)
    spec = chat(logprobs=False, top_logprobs=0).job.spec
    assert (spec.logprobs, spec.top_logprobs) == (False, 0)


def test_completions_logprobs_n_asks_for_the_chosen_token_and_n_more() -> None:
    for n in (0, 5):
        spec = completion_request({"model": "m", "prompt": "p", "logprobs": n}).job.spec
        assert (spec.logprobs, spec.top_logprobs) == (True, n)
    assert not completion_request({"model": "m", "prompt": "p"}).job.spec.logprobs


def refusal(endpoint: str, body: dict[str, Any]) -> BadRequestError:
    """The 400 that a chat (`endpoint` "chat") or text completion with `body` is refused with."""
    with pytest.raises(BadRequestError) as refused:
        if endpoint == "chat":
            chat(**body)
        else:
            completion_request({"model": "m", "prompt": "p", **body})
    return refused.value


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("chat", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("chat", {"logprobs": False, "top_logprobs": 1}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"logprobs": 1}, "logprobs"),
        ("completion", {"logprobs": 6}, "logprobs"),
        ("completion", {"logprobs": True}, "logprobs"),
        ("completion", {"logprobs": -1}, "logprobs"),
    ],
)
def test_logprobs_out_of_range_are_400s_naming_the_param(
    endpoint: str, body: dict[str, Any], param: str
) -> None:
    refused = refusal(endpoint, body)
    assert refused.param == param
    assert refused.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"n": 2, "temperature": 0}, "n"),  # a rule across fields names the one to change
        ({"logit_bias": {"12": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_invalid_values_are_400s_naming_the_field(body: dict[str, Any], param: str | None) -> None:
    with pytest.raises(BadRequestError) as refused:
        chat(**body)
    assert not isinstance(refused.value, UnsupportedParameterError)
    assert refused.value.param == param


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("chat", {"stream": "yes"}, "stream"),
        ("chat", {"n": "2"}, "n"),
        ("chat", {"max_tokens": "5"}, "max_tokens"),
        ("chat", {"max_completion_tokens": True}, "max_completion_tokens"),
        ("chat", {"temperature": "0.5"}, "temperature"),
        ("chat", {"seed": "7"}, "seed"),
        ("chat", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
        ("completion", {"max_tokens": "5"}, "max_tokens"),
        ("completion", {"stream": 1}, "stream"),
    ],
)
def test_values_of_the_wrong_json_type_are_400s_not_coerced(
    endpoint: str, body: dict[str, Any], param: str
) -> None:
    """OpenAI checks JSON types: `"stream": "yes"` is a 400, not a stream."""
    refused = refusal(endpoint, body)
    assert refused.type == "invalid_request_error"
    assert refused.param is not None and refused.param.startswith(param)


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("chat", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ("chat", {"stop": "x" * 201}, "stop"),
        ("chat", {"stop": ["a", 1]}, "stop"),
        ("completion", {"prompt": [1, "a"]}, "prompt"),
        ("completion", {"prompt": {"text": "a"}}, "prompt"),
    ],
)
def test_a_bad_value_of_a_union_field_names_the_field(
    endpoint: str, body: dict[str, Any], param: str
) -> None:
    """`param` is the body's field, never pydantic's name for a branch of its type."""
    with pytest.raises(BadRequestError) as refused:
        if endpoint == "chat":
            chat(**body)
        else:
            completion_request({"model": "m", **body})
    assert refused.value.param == param
    assert "constrained-str" not in refused.value.message


def test_a_max_tokens_over_the_limit_is_named_as_the_client_sent_it() -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(BadRequestError) as refused:
            chat(**{name: 5000})
        assert refused.value.param == name
        assert refused.value.message.startswith(f"{name}: ")


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(BadRequestError):
        chat_request(["model"], default_max_tokens=1)


def test_job_request_fields_are_named_as_openai_names_them() -> None:
    assert openai_param("spec.messages[0][2].content", chat=True) == "messages[2].content"
    assert openai_param("spec.messages", chat=True) == "messages"
    assert openai_param("spec.prompts[1]", chat=False) == "prompt[1]"
    assert openai_param("spec.max_new_tokens", chat=True) == "max_completion_tokens"
    assert openai_param("spec.max_new_tokens", chat=False) == "max_tokens"
    assert openai_param("spec.num_return_sequences", chat=False) == "n"


def test_body_schema_has_no_dangling_references() -> None:
    schema = body_schema(ChatCompletionBody)
    assert "$defs" not in schema and "$ref" not in str(schema)
    assert "messages" in schema["properties"]


def record(
    p: int, s: int, text: str, reason: str = "stop", prompt: int = 3, done: int = 2
) -> OutputRecord:
    return OutputRecord(
        prompt_index=p,
        sequence_index=s,
        text=text,
        finish_reason=reason,
        prompt_tokens=prompt,
        completion_tokens=done,
    )


def test_usage_counts_each_prompt_once() -> None:
    texts = [
        record(0, 0, "a"),
        record(0, 1, "b"),
        record(1, 0, "c", prompt=5),
        record(1, 1, "d", prompt=5),
    ]
    assert usage(texts) == {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}


def test_choices_are_numbered_prompt_by_prompt() -> None:
    texts = [record(1, 1, "d"), record(0, 0, "a"), record(1, 0, "c"), record(0, 1, "b")]
    body = completion_object(
        chat=False, completion_id="cmpl-x", model="m", created=1, texts=texts, per_prompt=2
    )
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, "a"),
        (1, "b"),
        (2, "c"),
        (3, "d"),
    ]


def test_chat_chunks_carry_a_role_then_text_then_a_finish_reason() -> None:
    parts = dict(chat=True, completion_id="chatcmpl-x", model="m", created=1, index=0)
    assert chunk_object(**parts, role=True)["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
    }
    assert chunk_object(**parts, text="Hi")["choices"][0]["delta"] == {"content": "Hi"}
    last = chunk_object(**parts, finish_reason="length")["choices"][0]
    assert (last["delta"], last["finish_reason"]) == ({}, "length")


ENTRIES = [
    {
        "token": "Hi",
        "logprob": -0.5,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
            {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]},
        ],
    },
    {
        "token": " there",
        "logprob": -2.0,
        "bytes": list(b" there"),
        "top_logprobs": [{"token": "!", "logprob": -1.0, "bytes": [33]}],
    },
]


def with_logprobs(text: str, entries: list[dict[str, Any]]) -> OutputRecord:
    return OutputRecord(0, 0, text, "length", 3, len(entries), data={"logprobs": entries})


def test_chat_logprobs_parse_as_the_sdks_types() -> None:
    body = completion_object(
        chat=True,
        completion_id="chatcmpl-x",
        model="m",
        created=1,
        texts=[with_logprobs("Hi there", ENTRIES)],
        per_prompt=1,
    )
    parsed = ChatCompletion.model_validate(body)
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == ["Hi", " there"]
    assert logprobs.content[0].top_logprobs[1].logprob == -1.5
    assert logprobs.content[1].bytes == list(b" there")
    plain = completion_object(
        chat=True, completion_id="c", model="m", created=1, texts=[record(0, 0, "a")], per_prompt=1
    )
    assert plain["choices"][0]["logprobs"] is None


def test_completion_logprobs_are_the_legacy_shape_with_the_chosen_token_in_each_top() -> None:
    body = completion_object(
        chat=False,
        completion_id="cmpl-x",
        model="m",
        created=1,
        texts=[with_logprobs("Hi there", ENTRIES)],
        per_prompt=1,
    )
    logprobs = Completion.model_validate(body).choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["Hi", " there"]
    assert logprobs.token_logprobs == [-0.5, -2.0]
    assert logprobs.top_logprobs == [{"Hi": -0.5, "Yo": -1.5}, {"!": -1.0, " there": -2.0}]
    assert logprobs.text_offset == [0, 2]
    chunk = chunk_object(
        chat=False,
        completion_id="cmpl-x",
        model="m",
        created=1,
        index=0,
        text=" there",
        logprobs=ENTRIES[1:],
        text_offset=2,
    )
    assert Logprobs.model_validate(chunk["choices"][0]["logprobs"]).text_offset == [2]
    chat_chunk = chunk_object(
        chat=True, completion_id="c", model="m", created=1, index=0, text="Hi", logprobs=ENTRIES[:1]
    )
    parsed = ChatCompletionChunk.model_validate(chat_chunk).choices[0].logprobs
    assert parsed is not None and parsed.content is not None and parsed.content[0].token == "Hi"
