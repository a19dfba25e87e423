"""Batch files end to end: upload request lines, run a batch job on a real worker, download
the output and error files; batches whose completion window passes end `expired`.

Real API, beat and worker processes over Redis, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_MODEL, install_tiny_model
from tests.support.harness import TERMINAL, Stack
from tests.support.services import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COMPLETIONS = "/v1/completions"


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": COMPLETIONS,
        "body": {"model": TINY_MODEL, "prompt": f"Fresh bread {custom_id}", **body},
    }


@pytest.fixture(scope="module")
def stack(
    database_url: str,
    broker: RedisServer,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """API + beat + one worker; batches go to the engine two lines at a time."""
    s = Stack(tmp_path_factory.mktemp("stack"), database_url, broker.url, batch_chunk_lines="2")
    install_tiny_model(tiny_model_dir, s.workdir / "data")
    try:
        s.start_api()
        s.start_beat()
        s.start_worker()
        yield s
    finally:
        s.stop()


def upload(stack: Stack, rows: list[dict[str, Any]]) -> str:
    raw = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    with stack.client() as c:
        resp = c.post("/v1/datasets", files={"file": ("batch.jsonl", raw)})
    assert resp.status_code == 201, resp.text
    assert resp.json()["schema"] == "batch_requests"
    dataset_id: str = resp.json()["id"]
    return dataset_id


def create_batch(stack: Stack, dataset_id: str, window: str) -> dict[str, Any]:
    spec = {"input_dataset": dataset_id, "endpoint": COMPLETIONS, "completion_window": window}
    with stack.client() as c:
        resp = c.post("/v1/jobs", json={"kind": "batch", "spec": spec})
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    return job


def download(stack: Stack, job_id: str, name: str) -> list[dict[str, Any]]:
    with stack.client() as c:
        resp = c.get(f"/v1/jobs/{job_id}/files/{name}")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/jsonl")
    return [json.loads(x) for x in resp.text.splitlines()]


def test_batch_file_runs_to_succeeded_with_output_and_error_files(one_worker: Stack) -> None:
    stack = one_worker
    rows = [
        line("greedy", max_tokens=6, temperature=0),
        line("sampled", max_tokens=5, temperature=0.9, top_p=0.9, seed=7),
        line("two", max_tokens=4, n=2, temperature=0.7, seed=3),
        line("stopped", max_tokens=8, temperature=0, stop=["\n", "zzz"]),
        line("default-length"),
        line("invalid", max_tokens=4, n=3, temperature=0),  # greedy cannot give 3 choices
    ]
    job = create_batch(stack, upload(stack, rows), "1h")
    done = stack.wait_status(job["id"], TERMINAL)
    assert done["status"] == "succeeded", done
    counts = {"total": 6, "completed": 5, "failed": 1}
    assert done["result"] == {"request_counts": counts}
    assert done["progress"] == 1.0

    output = download(stack, job["id"], "output")
    assert [o["custom_id"] for o in output] == [r["custom_id"] for r in rows[:5]]
    for out in output:
        assert out["id"].startswith("batch_req_") and out["error"] is None
        body = out["response"]["body"]
        assert out["response"]["status_code"] == 200
        assert body["object"] == "text_completion" and body["model"] == TINY_MODEL
        assert all(choice["text"] for choice in body["choices"])
    by_id = {o["custom_id"]: o["response"]["body"] for o in output}
    assert by_id["greedy"]["usage"]["completion_tokens"] == 6
    assert len(by_id["two"]["choices"]) == 2
    assert by_id["default-length"]["usage"]["completion_tokens"] == 16

    errors = download(stack, job["id"], "error")
    assert [e["custom_id"] for e in errors] == ["invalid"]
    assert errors[0]["response"] is None
    assert errors[0]["error"]["code"] == "invalid_request"
    assert "temperature" in errors[0]["error"]["message"]


def test_window_passing_while_running_expires_the_unfinished_lines(one_worker: Stack) -> None:
    stack = one_worker
    rows = [line(f"long-{i}", max_tokens=3000, temperature=0) for i in range(6)]
    job = create_batch(stack, upload(stack, rows), "1s")
    done = stack.wait_status(job["id"], TERMINAL, timeout=120)
    assert done["status"] == "expired", done
    assert done["error"]["type"] == "batch_expired"
    counts = done["result"]["request_counts"]
    assert counts["total"] == 6
    assert counts["completed"] + counts["failed"] == 6
    assert counts["failed"] >= 1

    output = download(stack, job["id"], "output")
    errors = download(stack, job["id"], "error")
    assert len(output) == counts["completed"]
    assert len(errors) == counts["failed"]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    ids = [o["custom_id"] for o in output] + [e["custom_id"] for e in errors]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows)


def test_batch_still_queued_after_its_window_is_expired_by_the_reconciler(
    one_worker: Stack,
) -> None:
    stack = one_worker
    stack.stop_workers()
    rows = [line(f"queued-{i}", max_tokens=4) for i in range(3)]
    job = create_batch(stack, upload(stack, rows), "1s")
    # no worker runs: the reconciler runs in the beat process
    done = stack.wait_status(job["id"], TERMINAL)
    stack.start_worker()
    assert done["status"] == "expired", done
    assert done["attempts"] == 0 and done["started_at"] is None
    assert done["result"] == {"request_counts": {"total": 3, "completed": 0, "failed": 3}}
    assert download(stack, job["id"], "output") == []
    errors = download(stack, job["id"], "error")
    assert [e["custom_id"] for e in errors] == [r["custom_id"] for r in rows]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
