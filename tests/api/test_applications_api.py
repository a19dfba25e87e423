"""Submit-time checks of the application features: pair datasets, the `rank` predict mode
and generation retrieval. A refused request is a typed 422 and creates no job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.settings import Settings
from db.models import Job
from db.session import session_scope
from tests.conftest import TINY_MODEL, install_tiny_model

PAIR_MODEL = "pair-cls"
AB_MODEL = "ab-cls"
TAGGER = "tagger"


@pytest.fixture(scope="module", autouse=True)
def models(settings: Settings, tiny_model_dir: Path) -> None:
    from tests.support.tiny_encoder import build_tiny_bert_classifier, build_tiny_bert_tagger

    install_tiny_model(tiny_model_dir, settings.data_dir)
    root = settings.models_dir
    build_tiny_bert_classifier(root / PAIR_MODEL, ["clicked", "skipped"])
    build_tiny_bert_classifier(root / AB_MODEL, ["a", "b"])
    build_tiny_bert_tagger(root / TAGGER, ["O", "B-X"])


def upload(client: TestClient, name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    resp = client.post("/v1/datasets", files={"file": (name, raw)})
    assert resp.status_code == 201, resp.text
    dataset: dict[str, Any] = resp.json()
    return dataset


def job_count(settings: Settings) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def refused(client: TestClient, settings: Settings, body: dict[str, Any], param: str) -> str:
    before = job_count(settings)
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["param"] == param
    assert job_count(settings) == before
    message: str = error["message"]
    return message


def rank_body(**spec: Any) -> dict[str, Any]:
    base = {"model": PAIR_MODEL, "mode": "rank", "query": "likes tents", "candidates": ["a", "b"]}
    return {"kind": "predict", "spec": {**base, **spec}}


def test_pair_dataset_upload(client: TestClient) -> None:
    rows = [
        {"text": "likes tents", "text_pair": "a tent", "label": "clicked"},
        {"text": "likes tents", "text_pair": "a pan", "label": "skipped"},
        {"text": "likes tents", "text_pair": "a pan", "label": "clicked"},
    ]
    dataset = upload(client, "pairs.jsonl", rows)
    assert dataset["schema"] == "pair_classification"
    assert dataset["labels"] == ["clicked", "skipped"]
    kinds = {w["kind"] for w in dataset["report"]["warnings"]}
    assert "conflicting_label" in kinds  # same pair, other label


def test_pair_row_without_label_names_the_missing_key(client: TestClient) -> None:
    raw = json.dumps({"text": "likes tents", "text_pair": "a tent"}).encode()
    resp = client.post("/v1/datasets", files={"file": ("p.jsonl", raw)})
    assert resp.status_code == 422
    assert "missing key label for a pair_classification row" in resp.json()["error"]["message"]


RANK_REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    ("no candidates", {"candidates": []}, "spec.candidates", ""),
    ("too many candidates", {"candidates": ["x"] * 1001}, "spec.candidates", ""),
    ("texts in rank mode", {"texts": ["x"]}, "spec", "not texts"),
    ("a causal LM", {"model": TINY_MODEL}, "spec.model", "not a sequence classifier"),
    ("a tagger", {"model": TAGGER}, "spec.model", "not a sequence classifier"),
    ("label not in the model", {"label": "bought"}, "spec.label", "clicked, skipped"),
    ("no default label", {"model": AB_MODEL}, "spec.label", "name the positive one"),
    ("unknown registered model", {"model": "ft:x:y:12345678"}, "spec.model", "registry"),
]


@pytest.mark.parametrize(
    ("case", "spec", "param", "says"), RANK_REFUSED, ids=[c[0] for c in RANK_REFUSED]
)
def test_unrankable_requests_are_422(
    client: TestClient, settings: Settings, case: str, spec: dict[str, Any], param: str, says: str
) -> None:
    assert says in refused(client, settings, rank_body(**spec), param)


def test_rank_fields_need_rank_mode(client: TestClient, settings: Settings) -> None:
    body = {"kind": "predict", "spec": {"model": PAIR_MODEL, "texts": ["x"], "top_k": 2}}
    assert "only apply to mode 'rank'" in refused(client, settings, body, "spec")


def test_rank_request_is_accepted(client: TestClient) -> None:
    resp = client.post("/v1/jobs", json=rank_body(top_k=1))
    assert resp.status_code == 202, resp.text
    assert resp.json()["spec"]["mode"] == "rank"


def chat_body(**spec: Any) -> dict[str, Any]:
    base = {"model": TINY_MODEL, "messages": [[{"role": "user", "content": "hi"}]]}
    return {"kind": "generate", "spec": {**base, **spec}}


def test_retrieval_checks(client: TestClient, settings: Settings) -> None:
    pairs = upload(client, "p.jsonl", [{"text": "a", "text_pair": "b", "label": "x"}])
    qa = upload(client, "qa.jsonl", [{"prompt": "Where?", "completion": "Here."}])
    retrieval = {"dataset": qa["id"], "k": 2, "embedding_model": PAIR_MODEL}
    plain = {"kind": "generate", "spec": {"model": TINY_MODEL, "prompts": ["hi"]}}
    plain["spec"]["retrieval"] = retrieval
    assert "chat" in refused(client, settings, plain, "spec")
    # tiny-gpt2 has no chat template: the prompt check refuses before retrieval is looked at
    refused(client, settings, chat_body(retrieval=retrieval), "spec.messages")
    from transformers import AutoTokenizer

    shutil.copytree(settings.models_dir / TINY_MODEL, settings.models_dir / "chat-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(settings.models_dir / "chat-gpt2")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(settings.models_dir / "chat-gpt2")
    wrong = {**retrieval, "dataset": pairs["id"]}
    message = refused(
        client, settings, chat_body(model="chat-gpt2", retrieval=wrong), "spec.retrieval.dataset"
    )
    assert "pair_classification" in message
    missing = {**retrieval, "dataset": "ds_" + "0" * 32}
    refused(
        client, settings, chat_body(model="chat-gpt2", retrieval=missing), "spec.retrieval.dataset"
    )
    resp = client.post("/v1/jobs", json=chat_body(model="chat-gpt2", retrieval=retrieval))
    assert resp.status_code == 202, resp.text
