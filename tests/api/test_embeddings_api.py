"""`POST /v1/embeddings` refusals, answered before any job exists (no worker runs here),
and embed jobs through `POST /v1/jobs`: same checks, Job.model set for batching. The
answers of running jobs are tested end to end (tests/e2e/test_openai_embeddings.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.enums import JobKind
from core.settings import Settings
from db.jobs import JobFilter, get_job, list_jobs
from db.registry import register_model
from db.session import session_scope
from tests.conftest import TINY_MODEL, install_tiny_model
from tests.support.auth import bearer, make_key
from tests.support.tiny_encoder import TINY_ENCODER, build_tiny_encoder

BACKENDS = ["sqlite"]  # refusals before any insert; the job paths run on both in e2e


@pytest.fixture(scope="module")
def client(settings: Settings, tiny_model_dir: Path) -> Iterator[TestClient]:
    """The API with a tiny encoder and a tiny GPT-2 installed, and hub downloads off."""
    build_tiny_encoder(settings.models_dir / TINY_ENCODER)
    install_tiny_model(tiny_model_dir, settings.data_dir)
    local = settings.model_copy(update={"hub_downloads": False, "hub_allowed_models": []})
    with TestClient(create_app(local)) as c:
        c.headers.update(bearer(make_key(local.database_url)))
        yield c


def embed(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/embeddings", json={"model": TINY_ENCODER, **body})


def error(response: Any) -> tuple[int, str, str | None]:
    err = response.json()["error"]
    return response.status_code, err["type"], err["param"]


def embed_jobs(settings: Settings) -> int:
    with session_scope(settings.database_url) as s:
        return len(list_jobs(s, JobFilter(kind=JobKind.EMBED), tenant_id=None, limit=1000))


def test_an_unknown_model_is_404_model_not_found(client: TestClient, settings: Settings) -> None:
    before = embed_jobs(settings)
    assert error(embed(client, model="no-such-encoder", input="x")) == (
        404,
        "model_not_found",
        "model",
    )
    assert error(embed(client, model="ft:tiny:x:00000001", input="x"))[:2] == (
        404,
        "model_not_found",
    )
    assert embed_jobs(settings) == before


def test_a_decoder_only_model_is_400_naming_model(client: TestClient, settings: Settings) -> None:
    """Its hidden states mean-pooled are no sentence embedding; refused before any job (a
    job would otherwise answer vectors, and this one would wait here for a worker)."""
    before = embed_jobs(settings)
    job = client.post(
        "/v1/jobs", json={"kind": "embed", "spec": {"model": TINY_MODEL, "input": "x"}}
    )
    assert error(job) == (422, "invalid_request", "spec.model")
    response = embed(client, model=TINY_MODEL, input="hello")
    assert error(response) == (400, "invalid_request_error", "model")
    assert "GPT2LMHeadModel" in response.json()["error"]["message"]
    assert embed_jobs(settings) == before


def test_an_adapter_is_400_naming_model(client: TestClient, settings: Settings) -> None:
    """A worker cannot load an adapter as an encoder; refused before any job, not failed by
    the worker (whose invalid_spec the route answers naming `input`)."""
    job_id = client.post("/v1/jobs", json={"kind": "noop"}).json()["id"]
    name = f"ft:{TINY_ENCODER}:lora:{job_id.removeprefix('job_')}"
    with session_scope(settings.database_url) as s:
        register_model(
            s,
            name=name,
            base_model=TINY_ENCODER,
            task="sequence_classification",
            method="lora",
            adapter=True,
            job_id=job_id,
            path=f"tenants/default/jobs/{job_id}/model",
            labels=["neg", "pos"],
            metrics={},
        )
    client.post(f"/v1/jobs/{job_id}/cancel")
    before = embed_jobs(settings)
    job = client.post("/v1/jobs", json={"kind": "embed", "spec": {"model": name, "input": "x"}})
    assert error(job) == (422, "invalid_request", "spec.model")
    response = embed(client, model=name, input="hello")
    assert error(response) == (400, "invalid_request_error", "model")
    assert "adapter" in response.json()["error"]["message"]
    assert embed_jobs(settings) == before


def test_dimensions_are_refused_naming_the_param(client: TestClient) -> None:
    status, type_, param = error(embed(client, input="hello", dimensions=16))
    assert (status, type_, param) == (400, "unsupported_parameter", "dimensions")
    assert "32 dimensions" in embed(client, input="x", dimensions=16).json()["error"]["message"]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "input[0] is an empty string"),
        ([], "non-empty array"),
        (["ok", ""], "input[1] is an empty string"),
        ([[1, 2], []], "input[1] is an empty array"),
        (["ok", [1]], "input[1] is not a string"),
        ([1, "x"], "input[0] is not"),
        ([True], "is not"),
        (["x"] * 2049, "at most 2048 inputs"),
        ({"text": "x"}, "give a string"),
    ],
)
def test_bad_inputs_are_refused_naming_input(client: TestClient, given: Any, message: str) -> None:
    response = embed(client, input=given)
    status, type_, param = error(response)
    assert (status, type_, param) == (400, "invalid_request_error", "input")
    assert message in response.json()["error"]["message"]


def test_an_input_past_the_context_is_400_naming_its_index(client: TestClient) -> None:
    long_text = " ".join(["hotel"] * 600)  # one token each, past 512 positions
    response = embed(client, input=["short", long_text])
    assert error(response) == (400, "context_length_exceeded", "input")
    assert "input[1] has 602 tokens" in response.json()["error"]["message"]
    assert error(embed(client, input=[[7] * 513]))[::2] == (400, "input")
    assert error(embed(client, input=[[7] * 512, [10**6]])) == (
        400,
        "invalid_request_error",
        "input",
    )


def test_unknown_fields_and_formats_are_refused_with_400_as_openai_does(
    client: TestClient,
) -> None:
    assert error(embed(client, input="x", encoding_format="int8")) == (
        400,
        "invalid_request_error",
        "encoding_format",
    )
    assert error(embed(client, input="x", temperature=1)) == (
        400,
        "unsupported_parameter",
        "temperature",
    )
    assert error(embed(client, input="x", model=None)) == (400, "invalid_request_error", "model")
    assert error(client.post("/v1/embeddings", json=["not", "an", "object"]))[::2] == (400, "body")
    garbled = client.post(
        "/v1/embeddings", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert garbled.status_code == 400


def test_an_embed_job_through_v1_jobs_is_checked_and_batched_by_model(
    client: TestClient, settings: Settings
) -> None:
    refused = client.post(
        "/v1/jobs", json={"kind": "embed", "spec": {"model": TINY_ENCODER, "input": [[7] * 600]}}
    )
    assert error(refused) == (400, "context_length_exceeded", "spec.input")
    created = client.post(
        "/v1/jobs",
        json={"kind": "embed", "spec": {"model": TINY_ENCODER, "input": "hello"}},
    )
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["spec"] == {"model": TINY_ENCODER, "input": ["hello"], "dimensions": None}
    with session_scope(settings.database_url) as s:
        row = get_job(s, job["id"])
        assert row is not None and row.model == TINY_ENCODER and row.kind == "embed"
    listed = client.get("/v1/jobs", params={"kind": "embed"}).json()["data"]
    assert job["id"] in [j["id"] for j in listed]
    client.post(f"/v1/jobs/{job['id']}/cancel")
