"""The OpenAI-shaped routes over HTTP (no worker): files, fine-tuning jobs, batches, models,
the error envelope, and pausing/resuming fine-tune jobs on our own API."""

from __future__ import annotations

import base64
import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from core.enums import EventType, FineTuneTask, JobStatus
from core.settings import Settings
from core.specs import default_hyperparameters
from db.attempts import finish_job, pause_attempt
from db.events import append_event
from db.jobs import claim_job, due_queued, get_job
from db.registry import register_model
from db.session import session_scope
from db.training import add_metrics
from tests.support.auth import bearer, make_key

CHAT = (
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
)
SENTIMENT = b"text,label\nI loved it,pos\nawful service,neg\n"
BATCH = (
    json.dumps(
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny-gpt2", "prompt": "Fresh bread", "max_tokens": 4},
        }
    ).encode()
    + b"\n"
)


def upload(client: TestClient, raw: bytes, purpose: str, name: str = "f.jsonl") -> Any:
    return client.post("/v1/files", files={"file": (name, raw)}, data={"purpose": purpose})


def fine_tune(client: TestClient, training_file: str = "", **body: Any) -> Any:
    return client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-gpt2", "training_file": training_file, **body},
    )


def error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) == {"type", "message", "param", "code"}
    return err


@pytest.fixture(scope="module")
def chat_file(client: TestClient) -> str:
    resp = upload(client, CHAT, "fine-tune", "chat.jsonl")
    assert resp.status_code == 200, resp.text
    file_id: str = resp.json()["id"]
    return file_id


def test_errors_use_openai_envelope_with_code(client: TestClient) -> None:
    err = error(client.get(f"/v1/jobs/job_{uuid.uuid4().hex}"), 404)
    assert err["code"] == err["type"] == "not_found"
    err = error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert err["code"] == "authentication_error"


def test_files_are_datasets_with_a_purpose(client: TestClient, chat_file: str) -> None:
    got = client.get(f"/v1/files/{chat_file}").json()
    assert got["object"] == "file" and got["purpose"] == "fine-tune"
    assert (got["bytes"], got["filename"], got["status"]) == (len(CHAT), "chat.jsonl", "processed")
    assert client.get(f"/v1/datasets/{chat_file}").json()["schema"] == "chat"
    assert client.get(f"/v1/files/{chat_file}/content").content == CHAT

    before = len(client.get("/v1/files", params={"limit": 1000}).json()["data"])
    err = error(upload(client, BATCH, "fine-tune"), 400)
    assert err["param"] == "purpose"
    assert error(upload(client, CHAT, "batch"), 400)["param"] == "purpose"
    assert error(upload(client, CHAT, "assistants"), 400)["param"] == "purpose"
    assert len(client.get("/v1/files", params={"limit": 1000}).json()["data"]) == before

    batch_id = upload(client, BATCH, "batch").json()["id"]
    batches = client.get("/v1/files", params={"purpose": "batch"}).json()["data"]
    assert [f["id"] for f in batches if f["id"] in (batch_id, chat_file)] == [batch_id]

    order = error(client.get("/v1/files", params={"order": "asc"}), 400)
    assert (order["type"], order["param"]) == ("invalid_request_error", "order")
    ours = client.get("/v1/jobs", params={"limit": 0})  # our own routes keep their 422
    assert (ours.status_code, ours.json()["error"]["type"]) == (422, "invalid_request")
    first = client.get("/v1/files", params={"limit": 1}).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert first["first_id"] == first["last_id"] == batch_id  # newest first
    second = client.get("/v1/files", params={"limit": 1, "after": batch_id}).json()
    assert second["data"][0]["id"] != batch_id

    deleted = client.delete(f"/v1/files/{batch_id}")
    assert deleted.json() == {"id": batch_id, "object": "file", "deleted": True}
    error(client.get(f"/v1/files/{batch_id}"), 404)
    error(client.get(f"/v1/files/job_{uuid.uuid4().hex}-output"), 404)


def test_fine_tuning_job_is_our_fine_tune_job(client: TestClient, chat_file: str) -> None:
    resp = fine_tune(
        client,
        chat_file,
        hyperparameters={"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5},
        suffix="bakery",
        seed=3,
        metadata={"team": "ops"},
    )
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert (job["object"], job["status"], job["model"]) == (
        "fine_tuning.job",
        "queued",
        "tiny-gpt2",
    )
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate_multiplier": pytest.approx(0.5),
    }
    assert (job["seed"], job["metadata"], job["fine_tuned_model"]) == (3, {"team": "ops"}, None)
    ours = client.get(f"/v1/jobs/{job['id']}").json()
    assert ours["kind"] == "finetune" and ours["spec"]["task"] == "causal_lm"
    assert ours["spec"]["hyperparameters"]["epochs"] == 2
    assert ours["spec"]["suffix"] == "bakery" and ours["metadata"] == {"team": "ops"}

    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    assert events["data"][0]["object"] == "fine_tuning.job.event"
    assert events["data"][0]["message"] == "job queued"
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
    listed = client.get("/v1/fine_tuning/jobs", params={"limit": 1}).json()
    assert listed["data"][0]["id"] == job["id"]
    ops = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "ops"}).json()["data"]
    assert [j["id"] for j in ops] == [job["id"]]
    assert client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "x"}).json()["data"] == []

    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-gpt2", "training_file": chat_file}, headers=key
    )
    again = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-gpt2", "training_file": chat_file}, headers=key
    )
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other_body = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-gpt3", "training_file": chat_file}, headers=key
    )
    assert error(other_body, 409)["param"] == "Idempotency-Key"

    cls = upload(client, SENTIMENT, "fine-tune", "s.csv").json()["id"]
    cls_job = fine_tune(client, cls).json()
    assert client.get(f"/v1/jobs/{cls_job['id']}").json()["spec"]["task"] == (
        "sequence_classification"
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"training_file": "ds_" + "0" * 32}, "training_file"),
        ({"suffix": "Not Allowed!"}, "suffix"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"integrations": [{"type": "wandb"}]}, "integrations"),
        ({"method": {"type": "rlhf"}}, "method.type"),
    ],
)
def test_fine_tuning_refusals_name_openai_fields(
    client: TestClient, chat_file: str, body: dict[str, Any], param: str
) -> None:
    before = client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    err = error(fine_tune(client, **{"training_file": chat_file, **body}), 400)
    assert (err["type"], err["param"]) == ("invalid_request_error", param)
    assert client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"] == before


@pytest.mark.parametrize("integrations", [None, []])
def test_fine_tuning_takes_integrations_that_ask_for_nothing(
    client: TestClient, chat_file: str, integrations: list[Any] | None
) -> None:
    """`integrations=None` (sent as null by the SDK) or `[]` asks for no integration, as
    OpenAI reads it; only an integration to run is refused."""
    resp = fine_tune(client, chat_file, integrations=integrations)
    assert resp.status_code == 200, resp.text
    assert resp.json()["integrations"] is None


PREFERENCE = (
    json.dumps(
        {
            "input": {"messages": [{"role": "user", "content": "Fresh bread?"}]},
            "preferred_output": [{"role": "assistant", "content": "Every morning."}],
            "non_preferred_output": [{"role": "assistant", "content": "No."}],
        }
    ).encode()
    + b"\n"
)


def _register(settings: Settings, client: TestClient, task: str) -> str:
    name = f"ft:tiny-gpt2:sft:{uuid.uuid4().hex[:8]}"
    job_id = client.post("/v1/jobs", json={"kind": "noop"}).json()["id"]
    with session_scope(settings.database_url) as s:
        register_model(
            s,
            name=name,
            base_model="tiny-gpt2",
            task=task,
            method="full",
            adapter=False,
            job_id=job_id,
            path=f"tenants/default/jobs/{job_id}/model",
            labels=[],
            metrics={},
        )
    return name


def test_dpo_method_is_our_dpo_objective(
    client: TestClient, settings: Settings, chat_file: str
) -> None:
    pairs = upload(client, PREFERENCE, "fine-tune", "pairs.jsonl").json()
    assert pairs["purpose"] == "fine-tune"
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 1}}}
    resp = fine_tune(client, pairs["id"], method=method)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["method"] == {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {
                "n_epochs": 1,
                "batch_size": 8,
                "learning_rate_multiplier": 1.0,
                "beta": 0.3,
            }
        },
    }
    spec = client.get(f"/v1/jobs/{job['id']}").json()["spec"]
    assert (spec["task"], spec["objective"], spec["dpo"]) == ("causal_lm", "dpo", {"beta": 0.3})
    default_beta = fine_tune(client, pairs["id"], method={"type": "dpo"}).json()
    assert default_beta["method"]["dpo"]["hyperparameters"]["beta"] == 0.1
    supervised = fine_tune(client, chat_file).json()
    assert supervised["method"]["type"] == "supervised"
    assert "beta" not in supervised["method"]["supervised"]["hyperparameters"]

    # chaining: a causal LM a supervised job registered is a DPO job's base; a classifier is not
    chained = fine_tune(client, pairs["id"], model=_register(settings, client, "causal_lm"))
    assert chained.status_code == 400  # a supervised job cannot train on preference pairs
    assert error(chained, 400)["param"] == "training_file"
    name = _register(settings, client, "causal_lm")
    assert fine_tune(client, pairs["id"], model=name, method=method).status_code == 200
    classifier = _register(settings, client, "sequence_classification")
    refused = fine_tune(client, pairs["id"], model=classifier, method=method)
    assert error(refused, 400)["param"] == "model"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"method": {"type": "reinforcement"}}, 400, "method.reinforcement"),
        ({"method": {"type": "dpo", "supervised": {}}}, 400, "method.supervised"),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            400,
            "method.dpo.hyperparameters.beta",
        ),
        ({"method": {"type": "dpo"}, "training_file": "chat"}, 400, "training_file"),
    ],
)
def test_dpo_refusals_name_openai_fields(
    client: TestClient, chat_file: str, body: dict[str, Any], status: int, param: str
) -> None:
    pairs = upload(client, PREFERENCE, "fine-tune", "pairs.jsonl").json()["id"]
    training_file = chat_file if "training_file" in body else pairs
    body = {k: v for k, v in body.items() if k != "training_file"}
    before = client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    err = error(fine_tune(client, training_file, **body), status)
    assert err["param"] == param, err
    assert client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"] == before


def test_hyperparameters_given_twice_are_refused(client: TestClient, chat_file: str) -> None:
    """Top-level hyperparameters (OpenAI's older place) and method's together: a 400 naming
    them, not one silently winning."""
    before = client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    twice = {
        "hyperparameters": {"n_epochs": 1},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    }
    err = error(fine_tune(client, chat_file, **twice), 400)
    assert err["param"] == "hyperparameters"
    assert client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"] == before
    once = {"method": twice["method"]}
    assert fine_tune(client, chat_file, **once).status_code == 200


PROMPTS = b"".join(
    json.dumps({"messages": [{"role": "user", "content": q}], "answer": a}).encode() + b"\n"
    for q, a in (("Fresh bread?", "every morning"), ("Open on Sunday?", "yes"))
)
GRADER = {
    "type": "multi",
    "name": "answer",
    "graders": {
        "exact": {
            "type": "string_check",
            "name": "exact",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "operation": "ilike",
        },
        "close": {
            "type": "text_similarity",
            "name": "close",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "evaluation_metric": "rouge_l",
        },
    },
    "calculate_output": "0.5 * exact + 0.5 * close",
}


def test_reinforcement_method_is_our_reinforcement_objective(client: TestClient) -> None:
    prompts = upload(client, PROMPTS, "fine-tune", "rft.jsonl").json()
    dataset = client.get(f"/v1/datasets/{prompts['id']}").json()
    assert (dataset["schema"], dataset["report"]["item_fields"]) == ("reinforcement", ["answer"])
    hyperparameters = {"n_epochs": 2, "eval_interval": 3, "generations": 2, "temperature": 0.7}
    method = {
        "type": "reinforcement",
        "reinforcement": {"grader": GRADER, "hyperparameters": hyperparameters},
    }
    resp = fine_tune(client, prompts["id"], method=method)
    assert resp.status_code == 200, resp.text
    shown = resp.json()["method"]
    assert shown["type"] == "reinforcement"
    assert shown["reinforcement"]["grader"] == GRADER
    assert shown["reinforcement"]["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate_multiplier": 1.0,
        "eval_interval": 3,
        "generations": 2,
        "max_completion_tokens": 64,
        "temperature": 0.7,
    }
    spec = client.get(f"/v1/jobs/{resp.json()['id']}").json()["spec"]
    assert (spec["task"], spec["objective"]) == ("causal_lm", "reinforcement")
    assert spec["hyperparameters"]["eval_steps"] == 3
    assert spec["reinforcement"]["generations"] == 2


def _reinforcement(grader: dict[str, Any] = GRADER, **hyperparameters: Any) -> dict[str, Any]:
    body = {"grader": grader, "hyperparameters": hyperparameters}
    return {"type": "reinforcement", "reinforcement": body}


@pytest.mark.parametrize(
    ("method", "status", "param", "says"),
    [
        (
            _reinforcement({**GRADER, "type": "python"}),
            400,
            "method.reinforcement.grader.type",
            "sandbox",
        ),
        (
            _reinforcement(
                {
                    **GRADER,
                    "graders": {"exact": {**GRADER["graders"]["exact"], "type": "score_model"}},
                }
            ),
            400,
            "method.reinforcement.grader.graders.exact.type",
            "not built",
        ),
        (
            _reinforcement(
                {
                    **GRADER,
                    "graders": {
                        "close": {**GRADER["graders"]["close"], "evaluation_metric": "cosine"}
                    },
                    "calculate_output": "close",
                }
            ),
            400,
            "method.reinforcement.grader.graders.close.evaluation_metric",
            "embeddings",
        ),
        (
            _reinforcement({**GRADER, "calculate_output": "exact + open(1)"}),
            400,
            "method.reinforcement.grader.calculate_output",
            "unknown function 'open'",
        ),
        (
            _reinforcement({**GRADER["graders"]["exact"], "reference": "{{item.city}}"}),
            400,
            "method.reinforcement.grader",
            "{{item.city}}",
        ),
        (
            _reinforcement(reasoning_effort="high"),
            400,
            "method.reinforcement.hyperparameters.reasoning_effort",
            "no reasoning",
        ),
        (
            _reinforcement(eval_samples=4),
            400,
            "method.reinforcement.hyperparameters.eval_samples",
            "not offered",
        ),
        (
            _reinforcement(generations=1),
            400,
            "method.reinforcement.hyperparameters.generations",
            "2",
        ),
    ],
)
def test_reinforcement_refusals_name_openai_fields(
    client: TestClient, method: dict[str, Any], status: int, param: str, says: str
) -> None:
    prompts = upload(client, PROMPTS, "fine-tune", "rft.jsonl").json()["id"]
    before = client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    err = error(fine_tune(client, prompts, method=method), status)
    assert err["param"] == param and says in err["message"], err
    assert client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"] == before


def test_a_chat_file_cannot_train_reinforcement(client: TestClient, chat_file: str) -> None:
    err = error(fine_tune(client, chat_file, method=_reinforcement()), 400)
    assert err["param"] == "training_file" and "needs reinforcement" in err["message"]


def test_batches_are_batch_jobs(client: TestClient, chat_file: str) -> None:
    err = error(
        client.post(
            "/v1/batches",
            json={"input_file_id": chat_file, "endpoint": "/v1/completions"},
        ),
        400,
    )
    assert err["param"] == "input_file_id"
    file_id = upload(client, BATCH, "batch").json()["id"]
    resp = client.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/completions",
            "completion_window": "24h",
            "metadata": {"run": "nightly"},
        },
    )
    assert resp.status_code == 200, resp.text
    batch = resp.json()
    assert (batch["object"], batch["status"], batch["input_file_id"]) == (
        "batch",
        "validating",
        file_id,
    )
    assert batch["request_counts"] == {"total": 1, "completed": 0, "failed": 0}
    assert batch["expires_at"] - batch["created_at"] == 24 * 3600
    assert client.get(f"/v1/jobs/{batch['id']}").json()["kind"] == "batch"
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"] is not None
    again = client.post(f"/v1/batches/{batch['id']}/cancel")  # changes nothing
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_models_answer_openai_and_modelyard_fields(client: TestClient, settings: Settings) -> None:
    name = f"ft:tiny-gpt2:sdk:{uuid.uuid4().hex[:8]}"
    job_id = client.post("/v1/jobs", json={"kind": "noop"}).json()["id"]
    with session_scope(settings.database_url) as s:
        register_model(
            s,
            name=name,
            base_model="tiny-gpt2",
            task="causal_lm",
            method="full",
            adapter=False,
            job_id=job_id,
            path=f"tenants/default/jobs/{name}/model",
            labels=[],
            metrics={},
        )
    page = client.get("/v1/models").json()
    assert page["object"] == "list"
    model = next(m for m in page["data"] if m["id"] == name)
    assert (model["object"], model["owned_by"], model["name"]) == ("model", "default", name)
    assert abs(model["created"] - datetime.now(UTC).timestamp()) < 3600
    deleted = client.delete(f"/v1/models/{name}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": name, "object": "model", "deleted": True}


def test_openai_sdk_lists_every_model_in_one_page(client: TestClient, settings: Settings) -> None:
    """The SDK's `models.list()` sends no `limit` and reads one page (OpenAI's list is not
    paged): it sees every model, past our default page of 20."""
    names = {_register(settings, client, "causal_lm") for _ in range(21)}
    listed = [m.id for m in _sdk(client).models.list()]
    assert names <= set(listed)
    assert len(listed) == len(set(listed))
    page = client.get("/v1/models", params={"limit": 20}).json()  # ours stays paged
    assert len(page["data"]) == 20 and page["has_more"] and page["next_cursor"]


def test_a_failed_fine_tuning_job_says_so_in_an_error_event(
    client: TestClient, settings: Settings, chat_file: str
) -> None:
    job_id = fine_tune(client, chat_file).json()["id"]
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, "w1", timedelta(seconds=30))
        assert finish_job(
            s,
            job_id,
            JobStatus.FAILED,
            attempt=1,
            error_type="out_of_memory",
            error_message="CUDA out of memory",
        )
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "out_of_memory", "message": "CUDA out of memory", "param": None}
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    assert [(e["level"], e["message"]) for e in events if e["level"] != "info"] == [
        ("error", "CUDA out of memory")
    ]


def test_metrics_events_carry_openai_train_loss(
    client: TestClient, settings: Settings, chat_file: str
) -> None:
    """OpenAI's metrics events name the step's loss `train_loss` (as our metrics do); the
    heartbeat's progress data calls it `loss`."""
    job_id = fine_tune(client, chat_file).json()["id"]
    with session_scope(settings.database_url) as s:
        data = {"progress": 0.375, "step": 3, "total_steps": 8, "loss": 1.5}
        append_event(s, job_id, EventType.PROGRESS, "", data)
        append_event(s, job_id, EventType.PROGRESS, "", {**data, "step": 4, "loss": None})
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert [(m["step"], m.get("train_loss")) for m in metrics] == [(4, None), (3, 1.5)]
    assert metrics[1]["total_steps"] == 8


def _sdk(client: TestClient) -> OpenAI:
    return OpenAI(
        base_url=f"{client.base_url}/v1",
        api_key=client.headers["Authorization"].removeprefix("Bearer "),
        http_client=client,
        max_retries=0,
    )


def test_a_succeeded_fine_tuning_job_has_a_results_file_of_its_step_metrics(
    client: TestClient, settings: Settings, chat_file: str
) -> None:
    """As OpenAI's: `result_files` names one file, purpose fine-tune-results, whose content
    is a CSV (base64-encoded) with a row per step; a cell is empty where that step has no
    such figure; our other metrics follow OpenAI's columns."""
    job_id = fine_tune(client, chat_file).json()["id"]
    results_id = f"{job_id}-results"
    running = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert running["result_files"] == []
    assert error(client.get(f"/v1/files/{results_id}"), 404)["param"] == "file_id"
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, "w1", timedelta(seconds=30))
        points = [(1, "train_loss", 2.5, 0.5), (1, "learning_rate", 1e-4, 0.5)]
        points += [(2, "train_loss", 1.25, 1.0), (2, "eval_loss", 1.5, 1.0)]
        points += [(2, "eval_accuracy", 0.75, 1.0)]
        add_metrics(s, job_id, points)
        assert finish_job(s, job_id, JobStatus.SUCCEEDED, attempt=1, result={"model": "ft:x"})

    sdk = _sdk(client)
    job = sdk.fine_tuning.jobs.retrieve(job_id)
    assert job.result_files == [results_id]
    meta = sdk.files.retrieve(results_id)
    assert (meta.purpose, meta.filename) == ("fine-tune-results", "step_metrics.csv")
    content = sdk.files.content(results_id).read()
    assert meta.bytes == len(content)
    rows = list(csv.reader(io.StringIO(base64.b64decode(content).decode())))
    assert rows == [
        [
            "step",
            "train_loss",
            "train_accuracy",
            "valid_loss",
            "valid_mean_token_accuracy",
            "epoch",
            "valid_accuracy",
            "learning_rate",
        ],
        ["1", "2.5", "", "", "", "0.5", "", "0.0001"],
        ["2", "1.25", "", "1.5", "", "1.0", "0.75", ""],
    ]
    refused = error(client.delete(f"/v1/files/{results_id}"), 409)
    assert "stays as long as its job" in refused["message"]
    assert client.get(f"/v1/files/{results_id}/content").status_code == 200


def test_pause_and_resume_rules(client: TestClient, settings: Settings, chat_file: str) -> None:
    noop = client.post("/v1/jobs", json={"kind": "noop"}).json()["id"]
    assert "fine-tune" in error(client.post(f"/v1/jobs/{noop}/pause"), 409)["message"]
    assert error(client.post(f"/v1/jobs/{noop}/resume"), 409)["type"] == "invalid_state"

    queued = fine_tune(client, chat_file).json()["id"]
    assert client.post(f"/v1/jobs/{queued}/pause").json()["status"] == "paused"
    assert client.post(f"/v1/jobs/{queued}/pause").json()["status"] == "paused"  # no change
    with session_scope(settings.database_url) as s:
        late = datetime.now(UTC) + timedelta(hours=1)
        assert queued not in [j.id for j in due_queued(s, late, timedelta(0))]  # not republished
    resumed = client.post(f"/v1/jobs/{queued}/resume")
    assert resumed.status_code == 202 and resumed.json()["status"] == "queued"
    error(client.post(f"/v1/jobs/{queued}/resume"), 409)

    running = fine_tune(client, chat_file).json()["id"]
    with session_scope(settings.database_url) as s:
        assert claim_job(s, running, "w1", timedelta(seconds=30))
    flagged = client.post(f"/v1/fine_tuning/jobs/{running}/pause").json()
    assert flagged["status"] == "running"
    assert client.get(f"/v1/jobs/{running}").json()["pause_requested"] is True
    with session_scope(settings.database_url) as s:
        assert pause_attempt(s, running, attempt=2, by="someone-else") is None
        assert pause_attempt(s, running, attempt=1, by="w1") is JobStatus.PAUSED
    with session_scope(settings.database_url) as s:
        job = get_job(s, running)
        assert job is not None
        assert (job.status, job.lease_owner, job.pause_requested) == ("paused", None, False)
        assert job.finished_at is None
    messages = [e["message"] for e in client.get(f"/v1/jobs/{running}/events").json()["data"]]
    assert "pause requested" in messages and "paused by w1 at its latest checkpoint" in messages
    assert client.post(f"/v1/fine_tuning/jobs/{running}/cancel").json()["status"] == "cancelled"
    conflict = client.post(f"/v1/jobs/{running}/pause")
    error(conflict, 409)
    assert conflict.headers["x-should-retry"] == "false"  # the OpenAI SDK does not retry it
    error(client.post(f"/v1/jobs/{running}/resume"), 409)


def test_another_tenant_sees_none_of_it(
    client: TestClient, settings: Settings, chat_file: str
) -> None:
    other = bearer(
        make_key(
            settings.database_url,
            ("jobs:read", "jobs:write", "models:write"),
            tenant=f"other-{uuid.uuid4().hex[:6]}",
        )
    )
    job = fine_tune(client, chat_file).json()["id"]
    for method, url in (
        ("GET", f"/v1/files/{chat_file}"),
        ("GET", f"/v1/files/{chat_file}/content"),
        ("DELETE", f"/v1/files/{chat_file}"),
        ("GET", f"/v1/fine_tuning/jobs/{job}"),
        ("POST", f"/v1/fine_tuning/jobs/{job}/pause"),
        ("POST", f"/v1/jobs/{job}/pause"),
        ("POST", f"/v1/jobs/{job}/resume"),
        ("GET", f"/v1/fine_tuning/jobs/{job}/events"),
    ):
        assert client.request(method, url, headers=other).status_code == 404, url
    refused = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-gpt2", "training_file": chat_file},
        headers=other,
    )
    assert error(refused, 400)["param"] == "training_file"
    assert client.get("/v1/files", headers=other).json()["data"] == []


def test_learning_rate_multiplier_scales_the_tasks_default(client: TestClient) -> None:
    """A tagger's multiplier 1.0 is token classification's own default learning rate."""
    conll = upload(client, b"Ada\tB-PER\nruns\tO\n\nBob\tB-PER\n", "fine-tune", "ner.conll")
    assert conll.status_code == 200, conll.text
    resp = fine_tune(client, conll.json()["id"], hyperparameters={"learning_rate_multiplier": 2})
    assert resp.status_code == 200, resp.text
    assert resp.json()["hyperparameters"]["learning_rate_multiplier"] == pytest.approx(2)
    spec = client.get(f"/v1/jobs/{resp.json()['id']}").json()["spec"]
    ner = default_hyperparameters(FineTuneTask.TOKEN_CLASSIFICATION)
    assert spec["task"] == "token_classification"
    assert spec["hyperparameters"]["learning_rate"] == pytest.approx(2 * ner.learning_rate)
    assert spec["hyperparameters"]["epochs"] == ner.epochs
