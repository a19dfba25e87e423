"""Fine-tune, predict and model-registry requests over HTTP: what is refused, and why."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.enums import JobKind, JobStatus
from core.settings import Settings
from db.attempts import finish_job
from db.jobs import claim_job, create_job
from db.models import Job
from db.registry import register_model
from db.session import session_scope
from db.training import add_checkpoint, add_metrics

TEXT = b'{"text": "hello there"}\n{"text": "general kenobi"}\n'
SENTIMENT = b"text,label\nI loved it,pos\nawful service,neg\nquite nice,pos\n"
SENTIMENT_VAL = b"text,label\nfine,pos\nmeh,neutral\n"


def upload(client: TestClient, raw: bytes, filename: str) -> str:
    resp = client.post("/v1/datasets", files={"file": (filename, raw)})
    assert resp.status_code == 201, resp.text
    dataset_id: str = resp.json()["id"]
    return dataset_id


def jobs_count(settings: Settings) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


@pytest.fixture(scope="module")
def data(client: TestClient) -> dict[str, str]:
    return {
        "text": upload(client, TEXT, "t.jsonl"),
        "cls": upload(client, SENTIMENT, "s.csv"),
        "cls_val": upload(client, SENTIMENT_VAL, "v.csv"),
    }


def finetune(**spec: Any) -> dict[str, Any]:
    return {"kind": "finetune", "spec": spec}


def refused(
    client: TestClient, settings: Settings, body: dict[str, Any], param: str, words: str
) -> None:
    before = jobs_count(settings)
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request"
    assert err["param"] == param
    assert words in err["message"]
    assert jobs_count(settings) == before


def test_unknown_dataset(client: TestClient, settings: Settings) -> None:
    missing = "ds_" + "0" * 32
    body = finetune(base_model="m", task="causal_lm", training_dataset=missing)
    refused(client, settings, body, "spec.training_dataset", missing)


def test_dataset_that_does_not_fit_the_task(
    client: TestClient, settings: Settings, data: dict[str, str]
) -> None:
    body = finetune(base_model="m", task="sequence_classification", training_dataset=data["text"])
    refused(client, settings, body, "spec.training_dataset", "holds text rows")


def test_packing_for_a_classifier_is_refused(
    client: TestClient, settings: Settings, data: dict[str, str]
) -> None:
    body = finetune(
        base_model="m",
        task="sequence_classification",
        training_dataset=data["cls"],
        hyperparameters={"packing": True},
    )
    refused(client, settings, body, "spec.hyperparameters", "packing applies to task causal_lm")


def test_exact_match_needs_rows_with_completions_and_a_causal_lm(
    client: TestClient, settings: Settings, data: dict[str, str]
) -> None:
    text = {"base_model": "m", "task": "causal_lm", "training_dataset": data["text"]}
    refused(client, settings, finetune(**text, exact_match={}), "spec.exact_match", "text rows")
    classifier = {**text, "task": "sequence_classification", "training_dataset": data["cls"]}
    refused(
        client,
        settings,
        finetune(**classifier, exact_match={}),
        "spec.exact_match",
        "task causal_lm only",
    )
    refused(
        client,
        settings,
        finetune(**text, metric_for_best_model="exact_match"),
        "spec.metric_for_best_model",
        "do not report 'exact_match'",
    )
    pairs = upload(client, b'{"prompt": "2+2=", "completion": "4"}\n' * 4, "pc.jsonl")
    resp = client.post(
        "/v1/jobs",
        json=finetune(
            **{**text, "training_dataset": pairs},
            exact_match={"examples": 2},
            metric_for_best_model="exact_match",
        ),
    )
    assert resp.status_code == 202, resp.text
    spec = resp.json()["spec"]
    assert spec["exact_match"] == {"examples": 2, "max_new_tokens": 64}
    assert spec["metric_for_best_model"] == "eval_exact_match"


def test_validation_labels_missing_from_training(
    client: TestClient, settings: Settings, data: dict[str, str]
) -> None:
    body = finetune(
        base_model="m",
        task="sequence_classification",
        training_dataset=data["cls"],
        validation_dataset=data["cls_val"],
    )
    refused(client, settings, body, "spec.validation_dataset", "neutral")


def test_hyperparameters_out_of_range_and_remote_code(
    client: TestClient, settings: Settings, data: dict[str, str]
) -> None:
    base = {"base_model": "m", "task": "causal_lm", "training_dataset": data["text"]}
    for spec, param in [
        ({**base, "hyperparameters": {"learning_rate": 5}}, "spec.hyperparameters.learning_rate"),
        ({**base, "hyperparameters": {"batch_size": 0}}, "spec.hyperparameters.batch_size"),
        ({**base, "method": "qlora"}, "spec.method"),
        ({**base, "trust_remote_code": True}, "spec.trust_remote_code"),
        ({**base, "suffix": "Bad Suffix!"}, "spec.suffix"),
        ({**base, "metric_for_best_model": "f1"}, "spec.metric_for_best_model"),
        ({**base, "objective": "dpo"}, "spec.training_dataset"),  # text rows are no pairs
        ({**base, "task": "token_classification", "objective": "dpo"}, "spec.objective"),
        ({**base, "dpo": {"beta": 0.2}}, "spec.dpo"),
    ]:
        resp = client.post("/v1/jobs", json=finetune(**spec))
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["param"] == param
    assert (
        "trust_remote_code"
        in client.post("/v1/jobs", json=finetune(**{**base, "trust_remote_code": True})).json()[
            "error"
        ]["message"]
    )
    unreported = client.post("/v1/jobs", json=finetune(**{**base, "metric_for_best_model": "f1"}))
    assert "causal_lm evaluations do not report 'f1'" in unreported.json()["error"]["message"]
    assert "loss, perplexity" in unreported.json()["error"]["message"]


def test_a_registered_name_too_long_for_the_registry_is_refused_at_submit(
    client: TestClient, settings: Settings, data: dict[str, str]
) -> None:
    """`ft:<base>:<suffix>:<job id>` over the registry's 255 characters would fail the job
    only once its model is stored, after all its training: refused before, naming the part
    to shorten."""
    base = {"task": "causal_lm", "training_dataset": data["text"]}
    long_base = "org/" + "b" * 220
    refused(client, settings, finetune(**base, base_model=long_base), "spec.base_model", "266")
    body = finetune(**base, base_model="org/" + "b" * 160, suffix="s" * 64)
    refused(client, settings, body, "spec.suffix", "at most 255")
    fits = client.post("/v1/jobs", json=finetune(**base, base_model="b" * 150, suffix="s" * 64))
    assert fits.status_code == 202, fits.text


PROMPTS = b'{"messages": [{"role": "user", "content": "Capital?"}], "answer": "Paris"}\n'
GRADER = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def test_reinforcement_refusals_on_our_api(
    client: TestClient, settings: Settings, data: dict[str, str]
) -> None:
    prompts = upload(client, PROMPTS, "rft.jsonl")
    base = {
        "base_model": "m",
        "task": "causal_lm",
        "objective": "reinforcement",
        "training_dataset": prompts,
        "reinforcement": {"grader": GRADER},
    }
    python = {"type": "python", "name": "p", "source": "def grade(sample, item): return 1"}
    city = {**GRADER, "reference": "{{item.city}}"}
    for spec, param, words in [
        (
            {**base, "reinforcement": {"grader": python}},
            "spec.reinforcement.grader.type",
            "sandbox",
        ),
        ({**base, "reinforcement": {"grader": city}}, "spec.reinforcement.grader", "{{item.city}}"),
        ({**base, "training_dataset": data["text"]}, "spec.training_dataset", "holds text rows"),
        ({**base, "reinforcement": None}, "spec", "needs a reinforcement block"),
    ]:
        refused(client, settings, finetune(**spec), param, words)


def test_base_model_directory_without_safetensors(
    client: TestClient, settings: Settings, data: dict[str, str]
) -> None:
    legacy = settings.models_dir / "legacy-bin"
    legacy.mkdir(parents=True, exist_ok=True)
    (legacy / "config.json").write_text("{}")
    (legacy / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    body = finetune(base_model="legacy-bin", task="causal_lm", training_dataset=data["text"])
    refused(client, settings, body, "spec.base_model", "safetensors")


def test_unknown_registry_models(
    client: TestClient, settings: Settings, data: dict[str, str]
) -> None:
    ghost = "ft:nothing:here:00000000"
    refused(
        client,
        settings,
        finetune(base_model=ghost, task="causal_lm", training_dataset=data["text"]),
        "spec.base_model",
        ghost,
    )
    refused(
        client,
        settings,
        {"kind": "generate", "spec": {"model": ghost, "prompts": ["hi"]}},
        "spec.model",
        ghost,
    )
    refused(
        client,
        settings,
        {"kind": "predict", "spec": {"model": ghost, "texts": ["x"]}},
        "spec.model",
        ghost,
    )


def _finished_job_with_model(settings: Settings, task: str) -> tuple[str, str]:
    with session_scope(settings.database_url) as s:
        job = create_job(s, kind=JobKind.FINETUNE, spec={}, priority=0, max_attempts=1, metadata={})
        claim_job(s, job.id, "w", timedelta(seconds=30))
        add_metrics(s, job.id, [(1, "train_loss", 2.0, 0.1), (2, "train_loss", 1.5, 0.2)])
        add_checkpoint(s, job.id, 2, f"jobs/{job.id}/checkpoints/checkpoint-2", {"eval_loss": 1.4})
        name = f"ft:base:{task.replace('_', '-')}:{job.id[4:12]}"
        register_model(
            s,
            name=name,
            base_model="base",
            task=task,
            method="full",
            adapter=False,
            job_id=job.id,
            path=f"jobs/{job.id}/model",
            labels=["neg", "pos"],
            metrics={"eval_accuracy": 0.9},
        )
        finish_job(s, job.id, JobStatus.SUCCEEDED, attempt=1, result={"model": name})
        return job.id, name


def test_registry_task_must_fit(
    client: TestClient, settings: Settings, data: dict[str, str]
) -> None:
    _, classifier = _finished_job_with_model(settings, "sequence_classification")
    refused(
        client,
        settings,
        {"kind": "generate", "spec": {"model": classifier, "prompts": ["hi"]}},
        "spec.model",
        "sequence_classification",
    )
    resp = client.post(
        "/v1/jobs", json={"kind": "predict", "spec": {"model": classifier, "texts": ["x"]}}
    )
    assert resp.status_code == 202, resp.text


def test_from_checkpoint_must_exist(
    client: TestClient, settings: Settings, data: dict[str, str]
) -> None:
    job_id, _ = _finished_job_with_model(settings, "causal_lm")
    base = {"base_model": "m", "task": "causal_lm", "training_dataset": data["text"]}
    refused(
        client,
        settings,
        finetune(**base, from_checkpoint={"job_id": job_id, "step": 7}),
        "spec.from_checkpoint",
        "step 7",
    )
    resp = client.post("/v1/jobs", json=finetune(**base, from_checkpoint={"job_id": job_id}))
    assert resp.status_code == 202, resp.text


def test_metrics_checkpoints_and_models_endpoints(client: TestClient, settings: Settings) -> None:
    job_id, name = _finished_job_with_model(settings, "sequence_classification")
    metrics = client.get(f"/v1/jobs/{job_id}/metrics", params={"name": "train_loss"}).json()
    assert [(m["step"], m["value"]) for m in metrics["data"]] == [(1, 2.0), (2, 1.5)]
    assert client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"][0]["step"] == 2
    assert client.get(f"/v1/models/{name}").json()["labels"] == ["neg", "pos"]
    assert name in [
        m["name"] for m in client.get("/v1/models", params={"limit": 100}).json()["data"]
    ]
    model_dir = Path(settings.data_dir) / f"jobs/{job_id}/model"
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"x")
    deleted = client.delete(f"/v1/models/{name}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": name, "object": "model", "deleted": True}
    assert not model_dir.exists()
    assert client.get(f"/v1/models/{name}").status_code == 404
    assert client.delete(f"/v1/models/{name}").status_code == 404
