"""`GET /v1/models/installed`: the model directories under the data dir's models/ that
hold safetensors weights and a config.json, with their architectures and whether their
tokenizer has a chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from api.installed_models import installed_models
from core.settings import Settings
from tests.support.auth import bearer, make_key


def write_model(
    directory: Path,
    architectures: list[str] | None = None,
    weights: str | None = "model.safetensors",
    config: str | None = None,
    tokenizer_config: dict[str, Any] | None = None,
    template_file: bool = False,
) -> None:
    directory.mkdir(parents=True)
    if config is None:
        config = json.dumps({"architectures": architectures or [], "model_type": "gpt2"})
    (directory / "config.json").write_text(config)
    if weights:
        (directory / weights).write_bytes(b"\0" * 16)
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if template_file:
        (directory / "chat_template.jinja").write_text("{{ messages }}")


def test_lists_installed_models_with_their_architectures_and_chat_templates(
    client: TestClient, settings: Settings
) -> None:
    models = settings.models_dir
    write_model(models / "chat-jinja", ["LlamaForCausalLM"], template_file=True)
    write_model(
        models / "chat-config",
        ["GPT2LMHeadModel"],
        tokenizer_config={"chat_template": "{{ messages }}"},
    )
    write_model(
        models / "chat-named",
        ["GPT2LMHeadModel"],
        tokenizer_config={"chat_template": [{"name": "default", "template": "{{ messages }}"}]},
    )
    write_model(models / "plain", ["BertForSequenceClassification"], tokenizer_config={})
    write_model(models / "org" / "hub-style", ["GPT2LMHeadModel"], template_file=True)
    write_model(models / "no-architectures", None, weights="model-00001-of-00002.safetensors")
    write_model(models / "torch-only", ["GPT2LMHeadModel"], weights="pytorch_model.bin")
    write_model(models / "broken-config", ["GPT2LMHeadModel"], config="{not json")
    (models / "weights-only").mkdir()
    (models / "weights-only" / "model.safetensors").write_bytes(b"\0")
    (models / ".partial").mkdir()
    (models / "README.txt").write_text("not a model")

    resp = client.get("/v1/models/installed")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list"
    assert body["data"] == [
        {
            "id": "chat-config",
            "object": "model",
            "architectures": ["GPT2LMHeadModel"],
            "chat_template": True,
        },
        {
            "id": "chat-jinja",
            "object": "model",
            "architectures": ["LlamaForCausalLM"],
            "chat_template": True,
        },
        {
            "id": "chat-named",
            "object": "model",
            "architectures": ["GPT2LMHeadModel"],
            "chat_template": True,
        },
        {"id": "no-architectures", "object": "model", "architectures": [], "chat_template": False},
        {
            "id": "org/hub-style",
            "object": "model",
            "architectures": ["GPT2LMHeadModel"],
            "chat_template": True,
        },
        {
            "id": "plain",
            "object": "model",
            "architectures": ["BertForSequenceClassification"],
            "chat_template": False,
        },
    ]


def test_installed_is_not_read_as_a_registry_name(client: TestClient) -> None:
    resp = client.get("/v1/models/installed")
    assert resp.status_code == 200
    assert "data" in resp.json() and "base_model" not in resp.json()
    assert client.get("/v1/models/ft:nothing:here:x").status_code == 404


def test_listing_needs_a_key_that_reads_jobs(client: TestClient, settings: Settings) -> None:
    reader = make_key(settings.database_url, scopes=("jobs:read",), tenant="installed-reader")
    writer = make_key(settings.database_url, scopes=("models:write",), tenant="installed-reader")
    assert client.get("/v1/models/installed", headers=bearer(reader)).status_code == 200
    assert client.get("/v1/models/installed", headers=bearer(writer)).status_code == 403
    anonymous = client.get("/v1/models/installed", headers={"Authorization": ""})
    assert anonymous.status_code == 401


def test_a_missing_models_dir_lists_nothing(tmp_path: Path) -> None:
    assert installed_models(tmp_path / "absent") == []
