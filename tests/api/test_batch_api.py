"""Batch files over HTTP on SQLite and PostgreSQL: uploading request lines, creating batch
jobs (and what is refused before anything is created or published), downloading the
output and error files, and the `expired` status."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.broker_scan import Presence
from core.dispatch import JobPublisher
from core.enums import JobKind, JobStatus
from core.settings import Settings
from db.batch import expire_queued, store_lines
from db.jobs import claim_job, create_job
from db.models import Dataset, Job
from db.outputs import OutputRecord
from db.registry import register_model
from db.session import session_scope
from workers.batch.lines import stored_error, stored_output

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def request(custom_id: str, url: str = COMPLETIONS, **body: Any) -> dict[str, Any]:
    content: dict[str, Any] = (
        {"prompt": f"Say {custom_id}"}
        if url == COMPLETIONS
        else {"messages": [{"role": "user", "content": f"Say {custom_id}"}]}
    )
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": "tiny-gpt2", **content, **body},
    }


def jsonl(*rows: dict[str, Any]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def upload(client: TestClient, raw: bytes, filename: str = "batch.jsonl") -> Any:
    return client.post("/v1/datasets", files={"file": (filename, raw)})


def upload_id(client: TestClient, raw: bytes, filename: str = "batch.jsonl") -> str:
    resp = upload(client, raw, filename)
    assert resp.status_code == 201, resp.text
    dataset_id: str = resp.json()["id"]
    return dataset_id


def count(settings: Settings, model: type[Job] | type[Dataset]) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def messages(settings: Settings) -> int:
    """Job messages in the broker (on a queue or unacknowledged)."""
    publisher = JobPublisher(settings)
    try:
        found = publisher.messages()
    finally:
        publisher.close()
    return found.scanned - found.unreadable


def batch(dataset: str, endpoint: str = COMPLETIONS, **spec: Any) -> dict[str, Any]:
    return {"kind": "batch", "spec": {"input_dataset": dataset, "endpoint": endpoint, **spec}}


def assert_error(resp: Any, status: int, type_: str, param: str | None = None) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == type_
    if param is not None:
        assert err["param"] == param
    message: str = err["message"]
    return message


def lines(resp: Any) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/jsonl")
    return [json.loads(line) for line in resp.text.splitlines()]


@pytest.fixture(scope="module")
def batches(client: TestClient) -> dict[str, str]:
    three = jsonl(request("a"), request("b", max_tokens=4), request("c", temperature=0))
    return {
        "completions": upload_id(client, three),
        "chat": upload_id(client, jsonl(request("x", CHAT), request("y", CHAT, n=2))),
        "text": upload_id(client, b'{"text": "hello"}\n{"text": "there"}\n'),
    }


def test_upload_recognises_a_batch_and_reports_it(client: TestClient) -> None:
    resp = upload(client, jsonl(request("a"), request("b", model="other-model")))
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["schema"] == "batch_requests"
    assert ds["rows"] == 2
    assert ds["report"]["batch"] == {
        "endpoint": COMPLETIONS,
        "models": ["other-model", "tiny-gpt2"],
        "requests": 2,
    }


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([request("a"), request("a")], "line 2: custom_id 'a' is already used on line 1"),
        ([request("a"), request("b", CHAT)], "line 2: url is /v1/chat/completions"),
        ([request("a"), {**request("b"), "method": "PUT"}], "line 2: method is 'PUT'"),
        ([request("a", temperature=3)], "line 1: body.temperature is 3"),
        ([request("a", CHAT, messages=[{"role": "user"}])], "line 1: body.messages[0] has no"),
    ],
)
def test_broken_batch_files_are_refused_and_not_stored(
    client: TestClient, settings: Settings, rows: list[dict[str, Any]], expected: str
) -> None:
    before = count(settings, Dataset)
    message = assert_error(upload(client, jsonl(*rows)), 422, "invalid_dataset", "file")
    assert message.startswith(expected)
    assert count(settings, Dataset) == before


def test_create_batch_job_commits_and_publishes(
    client: TestClient, settings: Settings, batches: dict[str, str]
) -> None:
    resp = client.post(
        "/v1/jobs", json={**batch(batches["completions"]), "metadata": {"run": "r1"}}
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert (job["kind"], job["status"], job["metadata"]) == ("batch", "queued", {"run": "r1"})
    assert job["spec"] == {
        "input_dataset": batches["completions"],
        "endpoint": COMPLETIONS,
        "completion_window": "24h",
    }
    publisher = JobPublisher(settings)
    assert publisher.messages().presence(job["id"]) is Presence.QUEUED
    publisher.close()
    chat = client.post("/v1/jobs", json=batch(batches["chat"], CHAT, completion_window="5s"))
    assert chat.status_code == 202, chat.text


def test_refused_batches_create_and_publish_nothing(
    client: TestClient, settings: Settings, batches: dict[str, str], tmp_path: Path
) -> None:
    registry = upload_id(client, jsonl(request("a", model="ft:tiny-gpt2:nope:0000")))
    (settings.models_dir / "no-weights").mkdir(parents=True)
    unsafe = upload_id(client, jsonl(request("a", model="no-weights")))
    dotdot = upload_id(client, jsonl(request("a", model="a/../b")))
    missing = "ds_" + "f" * 32
    cases: list[tuple[dict[str, Any], str, str]] = [
        (batch(missing), "spec.input_dataset", "does not exist"),
        (batch(batches["text"]), "spec.input_dataset", "holds text rows"),
        (batch(batches["chat"], COMPLETIONS), "spec.endpoint", "calls /v1/chat/completions"),
        (batch(registry), "spec.input_dataset", "is not in the registry"),
        (batch(unsafe), "spec.input_dataset", "has no safetensors"),
        (batch(dotdot), "spec.input_dataset", "not a model reference"),
        (batch(batches["completions"], completion_window="8d"), "spec.completion_window", ""),
        (batch(batches["completions"], completion_window="169h"), "spec.completion_window", ""),
        (batch(batches["completions"], "/v1/embeddings"), "spec.endpoint", ""),
        (batch("not-an-id"), "spec.input_dataset", ""),
        (batch(batches["completions"], model="m"), "spec.model", ""),
    ]
    jobs_before, messages_before = count(settings, Job), messages(settings)
    for body, param, words in cases:
        message = assert_error(client.post("/v1/jobs", json=body), 422, "invalid_request", param)
        assert words in message
    assert count(settings, Job) == jobs_before
    assert messages(settings) == messages_before


def test_a_batch_file_cannot_be_trained_on(
    client: TestClient, settings: Settings, batches: dict[str, str]
) -> None:
    body = {
        "kind": "finetune",
        "spec": {
            "base_model": "tiny-gpt2",
            "task": "causal_lm",
            "training_dataset": batches["completions"],
        },
    }
    message = assert_error(
        client.post("/v1/jobs", json=body), 422, "invalid_request", "spec.training_dataset"
    )
    assert "holds batch_requests rows" in message


def claimed_batch(settings: Settings, dataset: str, worker: str = "w1") -> str:
    with session_scope(settings.database_url) as s:
        job_id = create_job(
            s,
            kind=JobKind.BATCH,
            spec={"input_dataset": dataset, "endpoint": COMPLETIONS, "completion_window": "1h"},
            priority=0,
            max_attempts=3,
            metadata={},
        ).id
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, worker, timedelta(seconds=60))
    return job_id


def test_files_stream_stored_lines_in_order_while_running(
    client: TestClient, settings: Settings, batches: dict[str, str]
) -> None:
    job_id = claimed_batch(settings, batches["completions"])
    req = {"a": request("a"), "c": request("c")}
    text = OutputRecord(0, 0, "ünïcode ok", "length", 3, 4)
    with session_scope(settings.database_url) as s:
        assert store_lines(s, job_id, 1, [stored_output(2, req["c"], [text])])
        assert store_lines(s, job_id, 1, [stored_error(1, "b", "invalid_request", "no")])
    with session_scope(settings.database_url) as s:
        # only the live attempt writes
        assert not store_lines(s, job_id, 2, [stored_output(0, req["a"], [text])])
    with session_scope(settings.database_url) as s:
        assert store_lines(s, job_id, 1, [stored_output(0, req["a"], [text])])
    resp = client.get(f"/v1/jobs/{job_id}/files/output")
    out = lines(resp)
    assert resp.headers["content-disposition"] == f'attachment; filename="{job_id}_output.jsonl"'
    assert [o["custom_id"] for o in out] == ["a", "c"]
    assert out[1]["response"]["body"]["choices"][0]["text"] == "ünïcode ok"
    assert all(o["error"] is None for o in out)
    errors = lines(client.get(f"/v1/jobs/{job_id}/files/error"))
    assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in errors] == [
        ("b", None, "invalid_request")
    ]
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"


def test_files_of_a_batch_with_no_lines_yet_are_empty(
    client: TestClient, settings: Settings, batches: dict[str, str]
) -> None:
    job_id = claimed_batch(settings, batches["completions"])
    for name in ("output", "error"):
        assert lines(client.get(f"/v1/jobs/{job_id}/files/{name}")) == []


def test_files_are_only_for_batch_jobs(client: TestClient) -> None:
    resp = client.post(
        "/v1/jobs", json={"kind": "generate", "spec": {"model": "tiny-gpt2", "prompts": ["x"]}}
    )
    assert resp.status_code == 202, resp.text
    generate_id = resp.json()["id"]
    message = assert_error(
        client.get(f"/v1/jobs/{generate_id}/files/output"), 404, "not_found", "job_id"
    )
    assert "generate job" in message
    missing = "job_" + "0" * 32
    assert_error(client.get(f"/v1/jobs/{missing}/files/output"), 404, "not_found", "job_id")


def test_unknown_file_name(client: TestClient, settings: Settings, batches: dict[str, str]) -> None:
    job_id = claimed_batch(settings, batches["completions"])
    assert_error(client.get(f"/v1/jobs/{job_id}/files/input"), 404, "not_found", "name")


def test_expired_is_a_listed_terminal_status(
    client: TestClient, settings: Settings, batches: dict[str, str]
) -> None:
    resp = client.post("/v1/jobs", json=batch(batches["completions"], completion_window="1s"))
    job_id = resp.json()["id"]
    rows = [stored_error(i, cid, "batch_expired", "late") for i, cid in enumerate("abc")]
    counts = {"total": 3, "completed": 0, "failed": 3}
    with session_scope(settings.database_url) as s:
        assert expire_queued(
            s, job_id, rows, result={"request_counts": counts}, message="window passed"
        )
    with session_scope(settings.database_url) as s:
        assert not expire_queued(s, job_id, [], result={}, message="again")
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "expired"
    assert job["error"] == {"type": "batch_expired", "message": "window passed"}
    assert job["result"] == {"request_counts": counts}
    assert job["finished_at"] is not None
    listed = client.get("/v1/jobs", params={"status": "expired"}).json()["data"]
    assert [j["id"] for j in listed] == [job_id]
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "invalid_state")
    errors = lines(client.get(f"/v1/jobs/{job_id}/files/error"))
    assert [e["custom_id"] for e in errors] == ["a", "b", "c"]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [e["data"]["status"] for e in events if e["type"] == "status"] == [
        JobStatus.QUEUED.value,
        JobStatus.EXPIRED.value,
    ]


def test_registered_model_in_a_batch_resolves(client: TestClient, settings: Settings) -> None:
    name = "ft:tiny-gpt2:ok:1234"
    with session_scope(settings.database_url) as s:
        register_model(
            s,
            name=name,
            base_model="tiny-gpt2",
            task="causal_lm",
            method="full",
            adapter=False,
            job_id=None,
            path="models/x",
            labels=[],
            metrics={},
        )
    dataset = upload_id(client, jsonl(request("a", model=name)))
    resp = client.post("/v1/jobs", json=batch(dataset))
    assert resp.status_code == 202, resp.text
