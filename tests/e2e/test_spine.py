"""HTTP -> database -> Redis -> Celery worker -> database, with real processes.

Every test runs on SQLite and on PostgreSQL (see the `database_url` fixture).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest

from core.dispatch import JobPublisher
from core.enums import JobKind
from core.settings import Settings
from tests.conftest import TINY_MODEL
from tests.support.harness import Stack, wait_for
from tests.support.services import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FROZEN = re.compile(r"(\d+) startup objects frozen")
SHORT: dict[str, Any] = {"model": TINY_MODEL, "prompts": ["The blue mug"], "max_new_tokens": 8}


def long_spec(prompts: int) -> dict[str, Any]:
    """A job that runs for a few seconds per prompt on the tiny model."""
    return {
        "model": TINY_MODEL,
        "prompts": [f"Fresh bread {i}" for i in range(prompts)],
        "max_new_tokens": 1500,
        "temperature": 0,
    }


def status_events(stack: Stack, job_id: str) -> list[str]:
    return [e["data"]["status"] for e in stack.events(job_id) if e["type"] == "status"]


def claims(stack: Stack, job_id: str) -> int:
    return sum(1 for e in stack.events(job_id) if e["message"].startswith("claimed by"))


def drops(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return [e for e in stack.events(job_id) if e["message"].startswith("delivery dropped")]


def test_generation_job_succeeds_with_readable_outputs(one_worker: Stack) -> None:
    stack = one_worker
    spec = {**SHORT, "prompts": ["The blue mug", "Thank you"], "num_return_sequences": 2}
    job = stack.submit({**spec, "seed": 5}, metadata={"ticket": "T-9"})
    done = stack.wait_status(job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1
    assert done["progress"] == 1.0
    assert done["started_at"] and done["finished_at"]
    outputs = stack.outputs(job["id"])
    assert [(o["prompt_index"], o["sequence_index"]) for o in outputs] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert all(o["completion_tokens"] == 8 and o["finish_reason"] == "length" for o in outputs)
    assert all(o["text"] for o in outputs)
    assert status_events(stack, job["id"]) == ["queued", "running", "succeeded"]


def test_same_seed_gives_identical_texts(one_worker: Stack) -> None:
    stack = one_worker
    spec = {**SHORT, "seed": 1234, "temperature": 0.9, "max_new_tokens": 16}
    a = stack.submit(spec)
    b = stack.submit(spec)
    c = stack.submit({**spec, "seed": 4321})
    for job in (a, b, c):
        assert stack.wait_status(job["id"], ("succeeded", "failed"))["status"] == "succeeded"
    texts = [[o["text"] for o in stack.outputs(j["id"])] for j in (a, b, c)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_a_model_that_is_not_installed_is_refused_at_submit(one_worker: Stack) -> None:
    """Hub downloads are off by default: a model neither installed nor registered is a
    typed 422 naming it, not a job that spends its time in hub retries."""
    with one_worker.client() as c:
        resp = c.post(
            "/v1/jobs", json={"kind": "generate", "spec": {**SHORT, "model": "missing-model"}}
        )
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "model_not_installed" and "'missing-model'" in error["message"]
    assert error["param"] == "spec.model"


def test_cancel_queued_never_runs_and_cancel_running_stops(one_worker: Stack) -> None:
    stack = one_worker
    running = stack.submit(long_spec(8))
    stack.wait_status(running["id"], ("running",))
    # a job of another kind: a generation job on the same model would join the running decode group
    queued = stack.submit({"duration_s": 0.1}, kind="noop")
    assert stack.job(queued["id"])["status"] == "queued"

    with stack.client() as c:
        resp = c.post(f"/v1/jobs/{queued['id']}/cancel")
        assert resp.status_code == 202
        assert resp.json()["status"] == "cancelled"
        resp = c.post(f"/v1/jobs/{running['id']}/cancel")
        assert resp.status_code == 202
        assert resp.json()["cancel_requested"] is True

    stopped = stack.wait_status(running["id"], ("cancelled", "succeeded", "failed"), timeout=30)
    assert stopped["status"] == "cancelled"
    assert stopped["progress"] < 1.0
    assert stack.outputs(running["id"]) == []
    # the worker gets the cancelled job's message next and drops it without running
    wait_for(lambda: drops(stack, queued["id"]), 30, "queued job's message dropped")
    never = stack.job(queued["id"])
    assert never["status"] == "cancelled"
    assert never["attempts"] == 0
    assert never["started_at"] is None
    assert claims(stack, queued["id"]) == 0
    assert stack.outputs(queued["id"]) == []


def test_same_job_delivered_twice_to_two_workers_runs_once(one_worker: Stack) -> None:
    stack = one_worker
    second = stack.start_worker()
    publisher = JobPublisher(Settings(broker_url=stack.env["MODELYARD_BROKER_URL"]))
    try:
        job = stack.submit(long_spec(2))
        publisher.publish(job["id"], JobKind.GENERATE, 0)  # a duplicate delivery
        done = stack.wait_status(job["id"], ("succeeded", "failed"))
        wait_for(lambda: drops(stack, job["id"]), 30, "duplicate delivery dropped")
    finally:
        publisher.close()
        second.stop()
        stack.workers.remove(second)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
    assert claims(stack, job["id"]) == 1
    dropped = drops(stack, job["id"])
    assert len(dropped) == 1
    winner = next(e for e in stack.events(job["id"]) if e["message"].startswith("claimed by"))
    assert dropped[0]["data"]["worker"] != winner["data"]["worker"]
    assert len(stack.outputs(job["id"])) == 2


def test_killed_worker_job_completes_on_another_without_duplicates(one_worker: Stack) -> None:
    stack = one_worker
    victim = stack.workers[0]
    job = stack.submit(long_spec(4))
    wait_for(lambda: stack.job(job["id"])["progress"] >= 0.25, 60, "first prompt done")
    victim.kill9()
    stack.workers.remove(victim)
    stack.start_worker()
    done = stack.wait_status(job["id"], ("succeeded", "failed"), timeout=120)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    outputs = stack.outputs(job["id"])
    assert len(outputs) == 4
    assert len({(o["prompt_index"], o["sequence_index"]) for o in outputs}) == 4
    assert status_events(stack, job["id"]) == [
        "queued",
        "running",
        "queued",
        "running",
        "succeeded",
    ]
    assert any("expired" in e["message"] for e in stack.events(job["id"]))


def test_flushall_while_queued_loses_no_job(one_worker: Stack, broker: RedisServer) -> None:
    stack = one_worker
    # a no-op blocker: generation jobs on a busy generation worker would join its batch
    blocker = stack.submit({"duration_s": 4.0}, kind="noop")
    stack.wait_status(blocker["id"], ("running",))
    waiting = [stack.submit({**SHORT, "seed": i}) for i in range(4)]
    assert all(stack.job(j["id"])["status"] == "queued" for j in waiting)
    client = broker.client()
    client.flushall()
    assert client.dbsize() == 0
    client.close()
    for job in [blocker, *waiting]:
        done = stack.wait_status(job["id"], ("succeeded", "failed"), timeout=120)
        assert done["status"] == "succeeded"
        assert done["attempts"] == 1
        assert claims(stack, job["id"]) == 1
    for job in waiting:
        assert len(stack.outputs(job["id"])) == 1
        republished = [e for e in stack.events(job["id"]) if "republished" in e["message"]]
        assert len(republished) == 1


def test_noop_job_runs_through_the_same_pipeline(one_worker: Stack) -> None:
    with one_worker.client() as c:
        resp = c.post("/v1/jobs", json={"kind": "noop", "spec": {"duration_s": 0.2}})
    assert resp.status_code == 202, resp.text
    done = one_worker.wait_status(resp.json()["id"], ("succeeded", "failed"))
    assert (done["status"], done["attempts"], done["progress"]) == ("succeeded", 1, 1.0)
    assert status_events(one_worker, done["id"]) == ["queued", "running", "succeeded"]


def test_the_servers_freeze_their_startup_objects_once_ready(one_worker: Stack) -> None:
    """The API and the worker leave what they allocated before serving out of every full
    garbage collection (core.heap): a collection of it paused a burst for 100-190 ms."""
    stack = one_worker
    assert stack.api is not None
    for proc in (stack.api, *stack.workers):
        frozen = wait_for(
            functools.partial(_frozen_count, proc.log),
            30,
            f"{proc.name} freezes its startup objects",
        )
        assert frozen > 10_000  # the imported modules, at least


def _frozen_count(log: Path) -> int | None:
    found = FROZEN.search(log.read_text(errors="replace"))
    return int(found.group(1)) if found else None
