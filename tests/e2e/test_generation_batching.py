"""Generation jobs decoded together (one decode group) on a real worker: same results as
alone, cancel of one leaves the others, and the token stream adds up to the stored text.

Every test runs on SQLite and on PostgreSQL (see the `database_url` fixture).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from tests.conftest import TINY_MODEL
from tests.support.harness import Stack, wait_for
from workers.generation.jobs import JOINED_MESSAGE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TERMINAL = ("succeeded", "failed", "cancelled")

SPECS: list[dict[str, Any]] = [
    {"prompts": ["The blue mug", "Fresh bread"], "temperature": 0, "max_new_tokens": 40},
    {"prompts": ["Thank you"], "temperature": 0, "max_new_tokens": 120, "repetition_penalty": 1.4},
    {"prompts": ["Our support"], "temperature": 0.8, "top_k": 20, "seed": 3, "max_new_tokens": 60},
    {
        "prompts": ["Write a short"],
        "temperature": 1.2,
        "top_p": 0.9,
        "seed": 8,
        "num_return_sequences": 2,
        "max_new_tokens": 200,
    },
]


def texts(stack: Stack, job_id: str) -> list[tuple[int, int, str, str]]:
    return [
        (o["prompt_index"], o["sequence_index"], o["text"], o["finish_reason"])
        for o in stack.outputs(job_id)
    ]


def run_alone(stack: Stack, spec: dict[str, Any]) -> list[tuple[int, int, str, str]]:
    job = stack.submit({"model": TINY_MODEL, **spec})
    done = stack.wait_status(job["id"], TERMINAL)
    assert done["status"] == "succeeded", done
    return texts(stack, job["id"])


def joined(stack: Stack, job_id: str) -> bool:
    return any(e["message"] == JOINED_MESSAGE for e in stack.events(job_id))


def test_jobs_decoded_together_give_the_texts_they_give_alone(one_worker: Stack) -> None:
    stack = one_worker
    expected = [run_alone(stack, spec) for spec in SPECS]
    # a long job holds the worker's decode group open; the others join it as they arrive
    holder = stack.submit({"model": TINY_MODEL, "prompts": ["x"], "max_new_tokens": 1200})
    stack.wait_status(holder["id"], ("running",))
    jobs = [stack.submit({"model": TINY_MODEL, **spec}) for spec in SPECS]
    for job, want in zip(jobs, expected, strict=True):
        done = stack.wait_status(job["id"], TERMINAL, timeout=120)
        assert done["status"] == "succeeded", done
        assert done["result"]["model_cache"] == "hit"
        assert texts(stack, job["id"]) == want
    assert all(joined(stack, j["id"]) for j in jobs)
    assert stack.wait_status(holder["id"], TERMINAL, timeout=120)["status"] == "succeeded"


def test_cancel_one_job_inside_a_decode_group_leaves_the_others_correct(one_worker: Stack) -> None:
    stack = one_worker
    keep_spec = {"prompts": ["The quarterly report"], "temperature": 0, "max_new_tokens": 400}
    expected = run_alone(stack, keep_spec)
    doomed = stack.submit({"model": TINY_MODEL, "prompts": ["x"], "max_new_tokens": 3000})
    stack.wait_status(doomed["id"], ("running",))
    keep = stack.submit({"model": TINY_MODEL, **keep_spec})
    wait_for(lambda: joined(stack, keep["id"]), 30, "second job joined the decode group")
    with stack.client() as c:
        assert c.post(f"/v1/jobs/{doomed['id']}/cancel").status_code == 202
    assert stack.wait_status(doomed["id"], TERMINAL, timeout=60)["status"] == "cancelled"
    assert stack.outputs(doomed["id"]) == []
    assert stack.wait_status(keep["id"], TERMINAL, timeout=120)["status"] == "succeeded"
    assert texts(stack, keep["id"]) == expected


def read_stream(stack: Stack, job_id: str, events: list[tuple[str, Any]]) -> None:
    with stack.client() as c, c.stream("GET", f"/v1/jobs/{job_id}/stream", timeout=120) as resp:
        assert resp.status_code == 200
        kind = ""
        for line in resp.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])))
                if kind == "done":
                    return


def test_stream_yields_the_stored_text_while_the_job_runs(one_worker: Stack) -> None:
    stack = one_worker
    spec = {
        "model": TINY_MODEL,
        "prompts": ["The blue mug", "Thank you for your"],
        "num_return_sequences": 2,
        "temperature": 0.9,
        "seed": 21,
        "max_new_tokens": 600,
        "stop": ["mug keeps"],
    }
    job = stack.submit(spec)
    events: list[tuple[str, Any]] = []
    reader = threading.Thread(target=read_stream, args=(stack, job["id"], events))
    reader.start()
    reader.join(timeout=150)
    assert not reader.is_alive()
    assert events[-1][0] == "done"
    assert events[-1][1]["status"] == "succeeded"
    tokens = [data for kind, data in events if kind == "token"]
    assert len(tokens) > 8  # streamed piece by piece, not once at the end
    streamed: dict[tuple[int, int], str] = {}
    for t in tokens:
        key = (t["prompt_index"], t["sequence_index"])
        streamed[key] = streamed.get(key, "") + t["text"]
    stored = {(o["prompt_index"], o["sequence_index"]): o["text"] for o in stack.outputs(job["id"])}
    assert len(stored) == 4
    assert {k: v for k, v in streamed.items() if v} == {k: v for k, v in stored.items() if v}
