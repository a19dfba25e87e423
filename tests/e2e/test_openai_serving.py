"""OpenAI's SDK against `/v1/chat/completions` and `/v1/completions` of a real stack: each
request a generation job decoded by a real worker, answered whole or streamed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.shared_params import ResponseFormatJSONSchema
from pydantic import BaseModel

from tests.conftest import TINY_CHAT_MODEL, TINY_MODEL, install_tiny_chat_model
from tests.support.harness import Stack
from tests.support.tiny_model import build_tiny_gpt2, with_chat_template

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "Where is my parcel?"}]


@pytest.fixture(scope="module")
def serving(stack: Stack, tiny_model_dir: Path) -> Stack:
    install_tiny_chat_model(tiny_model_dir, stack.workdir / "data")
    return stack


@pytest.fixture(scope="module")
def client(serving: Stack) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{serving.base_url}/v1", api_key=serving.api_key, max_retries=0) as c:
        yield c


def job_count(stack: Stack) -> int:
    with stack.client() as http:
        return len(http.get("/v1/jobs", params={"limit": 100}).json()["data"])


def post(stack: Stack, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    with stack.client() as http:
        return http.post("/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_chat_completion_is_a_job_with_its_answer(serving: Stack, client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=TINY_CHAT_MODEL, messages=QUESTION, max_tokens=8, temperature=0
    )
    completion = raw.parse()
    job_id = raw.headers["Modelyard-Job-Id"]
    assert completion.id == f"chatcmpl-{job_id}"
    assert completion.object == "chat.completion"
    assert completion.model == TINY_CHAT_MODEL
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop")
    job = serving.job(job_id)
    assert job["kind"] == "generate" and job["status"] == "succeeded"
    [stored] = serving.outputs(job_id)
    assert choice.message.content == stored["text"]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == stored["completion_tokens"] <= 8
    assert completion.usage.prompt_tokens == stored["prompt_tokens"] > 0


def test_streamed_chunks_add_up_to_the_answer_and_end_with_usage(
    serving: Stack, client: OpenAI
) -> None:
    whole = client.chat.completions.create(
        model=TINY_CHAT_MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=TINY_CHAT_MODEL,
            messages=QUESTION,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_seed_reproduces_and_n_gives_that_many_choices(serving: Stack, client: OpenAI) -> None:

    def ask(seed: int) -> list[str]:
        out = client.chat.completions.create(
            model=TINY_CHAT_MODEL, messages=QUESTION, max_tokens=12, n=2, seed=seed
        )
        assert [c.index for c in out.choices] == [0, 1]
        return [c.message.content or "" for c in out.choices]

    first = ask(7)
    assert ask(7) == first
    assert ask(8) != first
    assert first[0] != first[1]


def test_a_chat_without_max_tokens_ends_where_the_context_does(
    serving: Stack, client: OpenAI, tmp_path: Path
) -> None:
    """OpenAI's chat default is whatever the context leaves: a prompt that fits is answered
    (up to CHAT_DEFAULT_MAX_TOKENS), never refused for a max_tokens the client did not set."""
    short = "tiny-gpt2-chat-48"
    built = build_tiny_gpt2(tmp_path / "short", n_positions=48)
    with_chat_template(built, serving.workdir / "data" / "models" / short)
    out = client.chat.completions.create(model=short, messages=QUESTION, temperature=0)
    [choice] = out.choices
    assert choice.finish_reason == "length"
    assert out.usage is not None
    assert 0 < out.usage.prompt_tokens < 48
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 48
    streamed = client.chat.completions.create(
        model=short, messages=QUESTION, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == choice.message.content
    with pytest.raises(openai.BadRequestError) as refused:  # one the client did set
        client.chat.completions.create(model=short, messages=QUESTION, max_tokens=48)
    assert refused.value.code == "context_length_exceeded"


def test_stop_ends_the_text_before_the_stop_string(serving: Stack, client: OpenAI) -> None:
    free = client.completions.create(
        model=TINY_MODEL, prompt="The blue mug", max_tokens=24, temperature=0
    )
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.completions.create(
        model=TINY_MODEL, prompt="The blue mug", max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_store_false_answers_without_keeping_the_text(serving: Stack, client: OpenAI) -> None:
    ask = {"model": TINY_CHAT_MODEL, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
    kept = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    raw = client.chat.completions.with_raw_response.create(**ask, store=False)
    unkept = raw.parse()
    assert unkept.choices[0].message.content == kept.choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**ask, store=False, stream=True)
        if c.choices
    )
    assert streamed == kept.choices[0].message.content
    [stored] = serving.outputs(raw.headers["Modelyard-Job-Id"])
    assert stored["text"] == ""
    assert stored["completion_tokens"] == unkept.usage.completion_tokens  # type: ignore[union-attr]


def test_completions_number_choices_prompt_by_prompt(client: OpenAI) -> None:
    out = client.completions.create(
        model=TINY_MODEL, prompt=["The blue mug", "Fresh bread"], max_tokens=5, n=2, seed=3
    )
    assert out.object == "text_completion"
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    alone = client.completions.create(
        model=TINY_MODEL, prompt="Fresh bread", max_tokens=5, n=2, seed=3
    )
    assert out.usage is not None and alone.usage is not None
    assert out.usage.prompt_tokens > alone.usage.prompt_tokens


def test_async_client_streams_completions(serving: Stack) -> None:
    async def run() -> tuple[str, str]:
        client = AsyncOpenAI(base_url=f"{serving.base_url}/v1", api_key=serving.api_key)
        whole = await client.completions.create(
            model=TINY_MODEL, prompt="Fresh bread", max_tokens=16, temperature=0
        )
        pieces = []
        async for chunk in await client.completions.create(
            model=TINY_MODEL, prompt="Fresh bread", max_tokens=16, temperature=0, stream=True
        ):
            pieces.append(chunk.choices[0].text)
        await client.close()
        return whole.choices[0].text, "".join(pieces)

    whole, streamed = asyncio.run(run())
    assert streamed == whole


def test_logit_bias_forces_a_token(serving: Stack, client: OpenAI) -> None:
    """OpenAI's logit_bias through the SDK: +100 on one token makes a greedy answer that
    token over and over (a ban of -100 is tested in the decode group)."""
    from transformers import AutoTokenizer

    directory = serving.workdir / "data" / "models" / TINY_CHAT_MODEL
    token = AutoTokenizer.from_pretrained(directory).decode([17])
    plain = client.completions.create(
        model=TINY_CHAT_MODEL, prompt="Fresh bread", max_tokens=6, temperature=0
    )
    forced = client.completions.create(
        model=TINY_CHAT_MODEL,
        prompt="Fresh bread",
        max_tokens=6,
        temperature=0,
        logit_bias={"17": 100},
    )
    assert forced.choices[0].text == token * 6
    assert plain.choices[0].text != forced.choices[0].text


def test_a_prompt_of_token_ids_answers_as_its_text(serving: Stack, client: OpenAI) -> None:
    """OpenAI's completions take token ids as the prompt (evaluation harnesses send them):
    the ids the text encodes to get the text's answer."""
    from transformers import AutoTokenizer

    directory = serving.workdir / "data" / "models" / TINY_CHAT_MODEL
    ids = AutoTokenizer.from_pretrained(directory)("Fresh bread")["input_ids"]
    as_text = client.completions.create(
        model=TINY_CHAT_MODEL, prompt="Fresh bread", max_tokens=6, temperature=0
    )
    as_ids = client.completions.create(
        model=TINY_CHAT_MODEL, prompt=[ids, ids], max_tokens=6, temperature=0
    )
    assert [c.text for c in as_ids.choices] == [as_text.choices[0].text] * 2
    assert as_ids.usage is not None and as_text.usage is not None
    assert as_ids.usage.prompt_tokens == 2 * as_text.usage.prompt_tokens == 2 * len(ids)


def test_echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_read_it(
    serving: Stack, client: OpenAI
) -> None:
    """lm-eval's loglikelihood request: echo, logprobs 1, max_tokens 1, token ids. Its
    prompt's tokens come first in the legacy logprobs (the first null), then the one
    completion token; the text is the prompt's followed by the completion's."""
    from transformers import AutoTokenizer

    directory = serving.workdir / "data" / "models" / TINY_CHAT_MODEL
    tokenizer = AutoTokenizer.from_pretrained(directory)
    context, continuation = "Fresh bread", " every day"
    ids = tokenizer(context + continuation)["input_ids"]
    context_length = len(tokenizer(context)["input_ids"])
    scored = client.completions.create(
        model=TINY_CHAT_MODEL, prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    [choice] = scored.choices
    assert choice.logprobs is not None
    tokens = choice.logprobs.tokens or []
    values = choice.logprobs.token_logprobs or []
    tops = choice.logprobs.top_logprobs or []
    assert len(tokens) == len(values) == len(tops) == len(ids) + 1
    assert values[0] is None and tops[0] is None
    assert choice.text.startswith(context + continuation)
    assert "".join(tokens) == choice.text
    assert (choice.logprobs.text_offset or [])[-1] == len(context + continuation)
    continuation_values = values[context_length:-1]
    assert continuation_values and all(v is not None and v < 0 for v in continuation_values)
    only_scored = client.completions.create(
        model=TINY_CHAT_MODEL, prompt=context, echo=True, max_tokens=0, logprobs=0
    )
    [alone] = only_scored.choices
    assert (alone.text, alone.finish_reason) == (context, "length")
    assert alone.logprobs is not None and alone.logprobs.token_logprobs is not None
    assert len(alone.logprobs.token_logprobs) == context_length
    assert only_scored.usage is not None and only_scored.usage.completion_tokens == 0
    same = values[1:context_length]  # the context's scores, as within the longer prompt
    assert alone.logprobs.token_logprobs[1:] == pytest.approx(same, abs=1e-4)
    as_text = client.completions.create(
        model=TINY_CHAT_MODEL, prompt=context, echo=True, max_tokens=3, temperature=0
    )
    plain = client.completions.create(
        model=TINY_CHAT_MODEL, prompt=context, max_tokens=3, temperature=0
    )
    assert as_text.choices[0].text == context + plain.choices[0].text


def test_errors_come_in_openai_shapes_and_create_nothing(serving: Stack, client: OpenAI) -> None:
    before = job_count(serving)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.chat.completions.create(
            model=TINY_CHAT_MODEL,
            messages=QUESTION,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    # OpenAI's default with tools is auto: this model's template shows no call format
    assert unsupported.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(
            model=TINY_CHAT_MODEL, messages=QUESTION, extra_body={"beam_width": 4}
        )
    assert unknown.value.param == "beam_width"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(
            model=TINY_CHAT_MODEL, messages=QUESTION, max_completion_tokens=4096
        )
    assert too_long.value.code == "context_length_exceeded"
    assert too_long.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as bad_value:
        client.chat.completions.create(model=TINY_CHAT_MODEL, messages=QUESTION, temperature=3)
    assert bad_value.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as no_chat_template:
        client.chat.completions.create(model=TINY_MODEL, messages=QUESTION, max_tokens=4)
    assert no_chat_template.value.param == "messages"
    assert job_count(serving) == before


def first_chunk_then(stack: Stack, body: dict[str, Any], headers: dict[str, str]) -> str:
    """Start a streamed chat completion, read until it gave out text, then hang up; the
    job's id."""
    with (
        httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        job_id = resp.headers["Modelyard-Job-Id"]
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                break
    return job_id


LONG = {
    "model": TINY_CHAT_MODEL,
    "messages": QUESTION,
    "max_tokens": 3000,
    "temperature": 0,
    "stream": True,
}


def test_a_client_that_hangs_up_cancels_its_job(one_worker: Stack, serving: Stack) -> None:
    job_id = first_chunk_then(serving, LONG, {})
    job = serving.wait_status(job_id, {"cancelled"}, timeout=30)
    assert job["cancel_requested"] is True
    assert serving.outputs(job_id) == []


def test_a_client_with_an_idempotency_key_gets_the_answer_on_retry(
    one_worker: Stack, serving: Stack
) -> None:
    body = {**LONG, "max_tokens": 200}
    key = {"Idempotency-Key": "hang-up-and-come-back"}
    job_id = first_chunk_then(serving, body, key)
    resp = post(serving, {**body, "stream": False}, key)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Modelyard-Job-Id"] == job_id
    assert resp.headers["Idempotent-Replayed"] == "true"
    [stored] = serving.outputs(job_id)
    assert resp.json()["choices"][0]["message"]["content"] == stored["text"]
    assert serving.job(job_id)["status"] == "succeeded"


def test_a_worker_lost_mid_stream_ends_it_with_an_error_and_the_retry_gets_the_answer(
    one_worker: Stack, serving: Stack
) -> None:
    body = {**LONG, "max_tokens": 2500}
    key = {"Idempotency-Key": "worker-lost-mid-stream"}
    events: list[Any] = []
    with (
        httpx.Client(base_url=serving.base_url, headers=serving.headers, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=key) as resp,
    ):
        job_id = resp.headers["Modelyard-Job-Id"]
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
            if len(events) == 5:
                one_worker.workers[0].kill9()
                one_worker.workers.clear()
                one_worker.start_worker()
    assert "[DONE]" not in events
    assert "error" in events[-1], events[-3:]
    assert "worker" in events[-1]["error"]["message"]
    resp2 = post(serving, {**body, "stream": False}, key)
    assert resp2.status_code == 200, resp2.text
    job = serving.job(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    [stored] = serving.outputs(job_id)
    assert resp2.json()["choices"][0]["message"]["content"] == stored["text"]


def langchain_chat(stack: Stack, max_completion_tokens: int) -> Any:
    """LangChain's ChatOpenAI on the tiny chat model of `stack`, greedy."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=TINY_CHAT_MODEL,
        base_url=f"{stack.base_url}/v1",
        api_key=stack.api_key,  # type: ignore[arg-type]
        max_completion_tokens=max_completion_tokens,
        temperature=0,
        max_retries=0,
    )


def test_langchain_chat_openai_invokes_and_streams(serving: Stack) -> None:
    chat = langchain_chat(serving, 12)
    whole = chat.invoke("Where is my parcel?")
    assert isinstance(whole.content, str) and whole.content
    job_ids = {job["id"] for job in list_jobs(serving)}
    assert str(whole.response_metadata["id"]).removeprefix("chatcmpl-") in job_ids
    streamed = "".join(str(piece.content) for piece in chat.stream("Where is my parcel?"))
    assert streamed == whole.content


def list_jobs(stack: Stack) -> list[dict[str, Any]]:
    with stack.client() as http:
        data: list[dict[str, Any]] = http.get("/v1/jobs", params={"limit": 100}).json()["data"]
        return data


class Verdict(BaseModel):
    """A bounded shape: a random-weight model completes it within a few tokens."""

    answer: Literal["yes", "no", "maybe"]
    urgent: bool


def test_sdk_parse_returns_the_pydantic_model_the_schema_names(client: OpenAI) -> None:
    for seed in range(3):
        parsed = client.chat.completions.parse(
            model=TINY_CHAT_MODEL,
            messages=QUESTION,
            response_format=Verdict,
            max_completion_tokens=40,
            seed=seed,
        )
        choice = parsed.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Verdict)
        assert Verdict.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_a_stop_string_still_ends_a_json_answer_where_it_matches(client: OpenAI) -> None:
    """Documented: `stop` applies inside a response format's JSON too, so a `stop` answer
    parses unless the request's own stop strings cut it."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "b": {"type": "boolean"}},
        "required": ["n", "b"],
        "additionalProperties": False,
    }
    pair: ResponseFormatJSONSchema = {
        "type": "json_schema",
        "json_schema": {"name": "pair", "schema": schema},
    }
    answer = client.chat.completions.create(
        model=TINY_CHAT_MODEL,
        messages=[{"role": "user", "content": "Where is my parcel?"}],
        response_format=pair,
        stop=[","],  # the grammar writes ", " between the two members
        max_completion_tokens=40,
        temperature=0,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert (choice.message.content or "").startswith('{"n": ')
    assert "," not in (choice.message.content or "")


def test_json_object_streams_a_json_object(client: OpenAI) -> None:
    chunks = client.chat.completions.create(
        model=TINY_CHAT_MODEL,
        messages=QUESTION,
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    pieces, reasons = [], []
    for c in chunks:
        if c.choices:
            pieces.append(c.choices[0].delta.content or "")
            reasons.append(c.choices[0].finish_reason)
    text = "".join(pieces)
    assert text.startswith("{")
    if reasons[-1] == "stop":
        assert isinstance(json.loads(text), dict)


def test_langchain_with_structured_output_gives_the_model(serving: Stack) -> None:
    chat = langchain_chat(serving, 40)
    verdict = chat.with_structured_output(Verdict, method="json_schema").invoke(
        "Is my parcel late?"
    )
    assert isinstance(verdict, Verdict)


def joined_bytes(entries: list[Any]) -> str:
    """The text the entries' token bytes spell (the random model's partial characters
    decode to U+FFFD, as in the text)."""
    return b"".join(bytes(e.bytes or []) for e in entries).decode("utf-8", errors="replace")


def test_chat_logprobs_parse_with_the_sdk_and_are_stored_with_the_text(
    serving: Stack, client: OpenAI
) -> None:
    ask = {"model": TINY_CHAT_MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    raw = client.chat.completions.with_raw_response.create(
        **ask,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=3,
        extra_headers={"Idempotency-Key": "logprobs-chat"},
    )
    completion = raw.parse()
    [choice] = completion.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert completion.usage is not None
    assert len(content) == completion.usage.completion_tokens > 0
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.token == token.top_logprobs[0].token  # greedy takes the most likely
        assert token.logprob == token.top_logprobs[0].logprob <= 0
    assert joined_bytes(content) == choice.message.content
    job_id = raw.headers["Modelyard-Job-Id"]
    [stored] = serving.outputs(job_id)
    assert [e["token"] for e in stored["data"]["logprobs"]] == [t.token for t in content]
    again = client.chat.completions.create(
        **ask,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=3,
        extra_headers={"Idempotency-Key": "logprobs-chat"},
    )
    assert again.id == completion.id
    assert again.choices[0].logprobs == choice.logprobs
    plain = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content


def test_streamed_chat_logprobs_come_with_the_text_they_complete(client: OpenAI) -> None:
    ask = {"model": TINY_CHAT_MODEL, "messages": QUESTION, "max_tokens": 20, "temperature": 0}
    whole = client.chat.completions.create(**ask, logprobs=True)  # type: ignore[call-overload]
    chunks = [
        c
        for c in client.chat.completions.create(**ask, logprobs=True, stream=True)  # type: ignore[call-overload]
        if c.choices
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    streamed = [
        t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content or []
    ]
    assert text == whole.choices[0].message.content
    assert joined_bytes(streamed) == text
    expected = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert expected is not None
    assert [t.token for t in streamed] == [t.token for t in expected]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in expected], abs=1e-4)
    assert sum(1 for c in chunks if c.choices[0].logprobs) > 1  # per delta, not all at the end


def test_completions_logprobs_n_in_the_legacy_shape(client: OpenAI) -> None:
    out = client.completions.create(
        model=TINY_MODEL, prompt="The blue mug", max_tokens=10, temperature=0, logprobs=2
    )
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and out.usage is not None
    tokens, values = logprobs.tokens or [], logprobs.token_logprobs or []
    tops, offsets = logprobs.top_logprobs or [], logprobs.text_offset or []
    assert len(tokens) == len(values) == len(tops) == len(offsets) == out.usage.completion_tokens
    for token, value, top in zip(tokens, values, tops, strict=True):
        assert top[token] == value == max(top.values())  # greedy: the chosen one is the best
        assert 1 <= len(top) <= 3  # the 2 most likely and the chosen one
    assert offsets[0] == 0 and offsets == sorted(offsets)
    streamed: list[str] = []
    for chunk in client.completions.create(
        model=TINY_MODEL,
        prompt="The blue mug",
        max_tokens=10,
        temperature=0,
        logprobs=2,
        stream=True,
    ):
        if chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.tokens or []
    assert streamed == tokens


def test_logprobs_of_a_job_that_does_not_store_its_text_come_from_the_stream(
    serving: Stack, client: OpenAI
) -> None:
    ask = {"model": TINY_CHAT_MODEL, "messages": QUESTION, "max_tokens": 10, "temperature": 0}
    kept = client.chat.completions.create(**ask, logprobs=True)  # type: ignore[call-overload]
    raw = client.chat.completions.with_raw_response.create(**ask, logprobs=True, store=False)
    unkept = raw.parse()
    assert unkept.choices[0].logprobs is not None and kept.choices[0].logprobs is not None
    got = [t.token for t in unkept.choices[0].logprobs.content or []]
    assert got == [t.token for t in kept.choices[0].logprobs.content or []]
    [stored] = serving.outputs(raw.headers["Modelyard-Job-Id"])
    assert stored["text"] == "" and "logprobs" not in (stored["data"] or {})
