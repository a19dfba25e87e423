"""Generation requests a model cannot serve are refused at submit: typed 422, nothing queued."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.settings import Settings
from db.models import Job
from db.session import session_scope
from tests.conftest import TINY_MODEL, install_tiny_model
from tests.support.tiny_encoder import TINY_ENCODER, build_tiny_encoder


@pytest.fixture(scope="module", autouse=True)
def tiny_installed(settings: Settings, tiny_model_dir: Path) -> None:
    install_tiny_model(tiny_model_dir, settings.data_dir)
    build_tiny_encoder(settings.models_dir / TINY_ENCODER)  # a BertModel: no language-model head


def body(**spec: Any) -> dict[str, Any]:
    return {"kind": "generate", "spec": {"model": TINY_MODEL, "prompts": ["Hello"], **spec}}


def jobs_and_messages(settings: Settings) -> tuple[int, int]:
    with session_scope(settings.database_url) as s:
        jobs = s.scalar(select(func.count()).select_from(Job)) or 0
    broker = redis.Redis.from_url(settings.broker_url)
    messages = sum(int(broker.llen(k)) for k in broker.keys("generate*"))
    broker.close()
    return jobs, messages


REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "prompt + new tokens over the context",
        {"max_new_tokens": 4096},
        "spec.prompts[0]",
        "context",
    ),
    ("chat without a template", {"chat": True}, "spec.chat", "chat template"),
    (
        "conversation without a template",
        {"prompts": None, "messages": [[{"role": "user", "content": "hi"}]]},
        "spec.messages",
        "chat template",
    ),
    ("stop list too long", {"stop": [f"s{i}" for i in range(9)]}, "spec.stop", ""),
    (
        "prompts x sequences over the limit",
        {"prompts": ["a"] * 256, "num_return_sequences": 8, "temperature": 1.0},
        "spec",
        "sequences per job",
    ),
    ("unknown registered model", {"model": "ft:nothing:here:12345678"}, "spec.model", "registry"),
    ("encoder without a language-model head", {"model": TINY_ENCODER}, "spec.model", "BertModel"),
    (
        "logit bias of a token id past the vocabulary",
        {"logit_bias": {"1": 2, "100000": -100}},
        "spec.logit_bias",
        "token id 100000 is not in the model's vocabulary",
    ),
]


@pytest.mark.parametrize(("case", "spec", "param", "says"), REFUSED, ids=[c[0] for c in REFUSED])
def test_unservable_generation_is_422_and_queues_nothing(
    client: TestClient, settings: Settings, case: str, spec: dict[str, Any], param: str, says: str
) -> None:
    before = jobs_and_messages(settings)
    resp = client.post("/v1/jobs", json=body(**spec))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["param"] == param
    assert says in error["message"]
    assert jobs_and_messages(settings) == before


def test_a_prompt_that_fits_is_accepted(client: TestClient, settings: Settings) -> None:
    resp = client.post("/v1/jobs", json=body(max_new_tokens=4000))
    assert resp.status_code == 202, resp.text
    assert resp.json()["spec"]["max_new_tokens"] == 4000


def test_an_encoder_is_refused_by_the_openai_routes_naming_model(
    client: TestClient, settings: Settings
) -> None:
    """Loaded as a causal LM, a BertModel gets a head of untrained weights and answers noise:
    chat and text completions refuse it before any job, naming `model`."""
    before = jobs_and_messages(settings)
    chat = client.post(
        "/v1/chat/completions",
        json={"model": TINY_ENCODER, "messages": [{"role": "user", "content": "hi"}]},
    )
    text = client.post("/v1/completions", json={"model": TINY_ENCODER, "prompt": "Hello"})
    for resp in (chat, text):
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", "model")
        assert "language-model head" in error["message"]
    assert jobs_and_messages(settings) == before


def test_a_prompt_token_id_past_the_vocabulary_is_a_400_naming_the_prompt(
    client: TestClient, settings: Settings
) -> None:
    before = jobs_and_messages(settings)
    resp = client.post(
        "/v1/completions", json={"model": TINY_MODEL, "prompt": [[5, 6], [7, 100000]]}
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "prompt[1]"
    assert "token id 100000 is not in the model's vocabulary" in error["message"]
    assert jobs_and_messages(settings) == before
    fits = client.post("/v1/jobs", json=body(prompts=None, prompt_token_ids=[[5, 6]]))
    assert fits.status_code == 202, fits.text


def test_a_logit_bias_past_the_vocabulary_is_a_400_naming_logit_bias(
    client: TestClient, settings: Settings
) -> None:
    before = jobs_and_messages(settings)
    resp = client.post(
        "/v1/completions",
        json={"model": TINY_MODEL, "prompt": "Hello", "logit_bias": {"100000": 5}},
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "logit_bias"
    assert jobs_and_messages(settings) == before
