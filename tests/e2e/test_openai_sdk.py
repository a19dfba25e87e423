"""OpenAI's own Python SDK pointed at a real stack: files, fine-tuning jobs (events,
checkpoints, pause/resume, preference tuning), batches of completions on the fine-tuned
model, models.

Real API, beat and worker processes; PostgreSQL only (the SQLite paths are the ones of
/v1/jobs and /v1/datasets, tested there).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Any

import openai
import pytest
from openai import OpenAI

from modelyard.client import Client
from tests.conftest import TINY_MODEL
from tests.support.harness import Stack, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

CONVERSATIONS = [
    ("What is fresh bread?", "Bread baked this morning."),
    ("Which oven is hot?", "The stone oven by the door."),
    ("When do you open?", "At seven, every day."),
    ("Do you sell rye?", "Yes, dark rye on Fridays."),
]


def chat_jsonl(rows: int) -> bytes:
    lines = []
    for i in range(rows):
        question, answer = CONVERSATIONS[i % len(CONVERSATIONS)]
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


def preference_jsonl(rows: int) -> bytes:
    """OpenAI's preference rows: the answer given, and a worse one."""
    lines = []
    for i in range(rows):
        question, answer = CONVERSATIONS[i % len(CONVERSATIONS)]
        row = {
            "input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": answer}],
            "non_preferred_output": [{"role": "assistant", "content": "I do not know."}],
        }
        lines.append(json.dumps(row))
    return ("\n".join(lines) + "\n").encode()


def batch_jsonl(model: str) -> bytes:
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0},
        }
        for i, prompt in enumerate(["Fresh bread", "The oven"])
    ]
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


@pytest.fixture(scope="module")
def client(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0)


def wait_job(client: OpenAI, job_id: str, statuses: tuple[str, ...], stack: Stack) -> Any:
    def check() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in statuses else None

    try:
        return wait_for(check, 120, f"fine-tuning job {job_id} in {statuses}", 0.3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None


def test_fine_tune_then_batch_on_the_fine_tuned_model(client: OpenAI, stack: Stack) -> None:
    uploaded = client.files.create(
        file=("chat.jsonl", io.BytesIO(chat_jsonl(8))), purpose="fine-tune"
    )
    assert (uploaded.object, uploaded.purpose, uploaded.filename) == (
        "file",
        "fine-tune",
        "chat.jsonl",
    )
    assert client.files.retrieve(uploaded.id).bytes == len(chat_jsonl(8))
    assert client.files.content(uploaded.id).content == chat_jsonl(8)
    assert uploaded.id in [f.id for f in client.files.list(purpose="fine-tune")]

    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2},
        suffix="sdk",
        seed=7,
        metadata={"team": "ops"},
    )
    assert job.object == "fine_tuning.job"
    assert job.status in ("queued", "running")
    assert (job.seed, job.metadata, job.training_file) == (7, {"team": "ops"}, uploaded.id)
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 4
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=5)]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "ops"})] == [job.id]

    done = wait_job(client, job.id, ("succeeded", "failed", "cancelled"), stack)
    assert done.status == "succeeded", done.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=200)
    messages = [e.message for e in events.data]
    assert events.data[0].created_at >= events.data[-1].created_at  # newest first
    assert "job queued" in messages and any("succeeded" in m for m in messages)
    older = client.fine_tuning.jobs.list_events(job.id, limit=2, after=events.data[1].id)
    assert [e.id for e in older.data] == [e.id for e in events.data[2:4]]

    # one epoch over every row (8 rows leave none out for validation): the tokens trained
    # are those the dataset's token report says an epoch keeps, and those first estimated
    with stack.client() as c:
        report = c.get(f"/v1/datasets/{uploaded.id}/tokens", params={"model": TINY_MODEL}).json()
    assert report["examples"] == 8 and report["tokens_kept"] > 0
    assert done.trained_tokens == report["tokens_kept"]
    started = next(e for e in events.data if e.message == "training started")
    estimate = started.data["estimate"]  # type: ignore[index]
    assert (estimate["steps"], estimate["tokens"]) == (2, report["tokens_kept"])

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number == 2  # 8 rows / batch 4
    assert checkpoints[0].fine_tuning_job_id == job.id

    name = done.fine_tuned_model
    assert name.startswith(f"ft:{TINY_MODEL}:sdk:")
    assert client.models.retrieve(name).id == name
    assert name in [m.id for m in client.models.list()]

    requests = client.files.create(
        file=("requests.jsonl", io.BytesIO(batch_jsonl(name))), purpose="batch"
    )
    created = client.batches.create(
        input_file_id=requests.id, endpoint="/v1/completions", completion_window="24h"
    )
    assert created.status in ("validating", "in_progress")

    def finished() -> Any:
        b = client.batches.retrieve(created.id)
        return b if b.status in ("completed", "failed", "expired", "cancelled") else None

    batch = wait_for(finished, 120, "batch done", 0.3)
    assert batch.status == "completed", batch.errors
    assert (batch.request_counts.total, batch.request_counts.completed) == (2, 2)
    assert batch.error_file_id is None and batch.output_file_id is not None
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    lines = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["req-0", "req-1"]
    for line in lines:
        body = line["response"]["body"]
        assert body["model"] == name
        assert (
            isinstance(body["choices"][0]["text"], str) and body["usage"]["completion_tokens"] > 0
        )
    assert created.id in [b.id for b in client.batches.list()]

    # Cancel and bad input come back as the SDK's own exceptions (a 409 is final, even for
    # a client that would retry it).
    with pytest.raises(openai.ConflictError):
        client.with_options(max_retries=2).fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    with pytest.raises(openai.BadRequestError) as refused:  # a 400, as OpenAI answers it
        client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=requests.id)
    assert refused.value.body["param"] == "training_file"  # type: ignore[index]
    assert refused.value.code == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("r.jsonl", io.BytesIO(batch_jsonl(name))), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("job_" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve(job.id)  # a fine-tuning job is not a batch
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{stack.base_url}/v1", api_key="nope", max_retries=0).models.list()

    assert client.models.delete(name).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(name)


def test_pause_rests_at_a_checkpoint_and_resume_continues_from_it(
    client: OpenAI, stack: Stack
) -> None:
    uploaded = client.files.create(
        file=("chat.jsonl", io.BytesIO(chat_jsonl(16))), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 50, "batch_size": 1},
    )

    def training() -> bool:
        events = client.fine_tuning.jobs.list_events(job.id, limit=50).data
        return any(e.type == "metrics" for e in events)

    wait_for(training, 120, "training steps reported", 0.3)
    started = wait_for(
        lambda: next((e for e in stack.events(job.id) if e["message"] == "training started"), None),
        120,
        "the training started event",
        0.3,
    )
    estimate: dict[str, Any] = started["data"]["estimate"]
    earlier = [
        j.id
        for j in client.fine_tuning.jobs.list(limit=20)
        if j.status == "succeeded" and j.model == TINY_MODEL
    ]
    if earlier:  # a fine-tune of the same base model finished on this host: its throughput counts
        assert estimate["tokens_per_s"] > 0 and estimate["eta_s"] is not None, estimate
        assert any(job_id in estimate["eta_basis"] for job_id in earlier), estimate
    else:
        assert estimate["eta_s"] is None and estimate["eta_basis"].startswith("no ETA"), estimate
    wait_for(
        lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 120, "a checkpoint", 0.3
    )
    assert client.fine_tuning.jobs.pause(job.id).status in ("running", "paused")
    paused = wait_job(client, job.id, ("paused",), stack)
    assert paused.finished_at is None
    with stack.client() as c:
        ours = c.get(f"/v1/jobs/{job.id}").json()
    assert ours["status"] == "paused" and not ours["pause_requested"]
    watched = subprocess.run(
        [sys.executable, "-m", "modelyard", "watch", job.id, "--url", stack.base_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MODELYARD_API_KEY": stack.api_key},
    )
    assert watched.returncode == 7, watched.stdout + watched.stderr  # rests: watch stops
    assert f"{job.id} paused" in watched.stdout
    step = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
    with Client(stack.base_url, api_key=stack.api_key) as ours_client:  # our SDK resumes too
        assert ours_client.resume(job.id)["status"] in ("queued", "running")
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job.id)  # no longer paused

    def resumed_from() -> int | None:
        for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data:
            if e.message.startswith("resuming from step"):
                return int(e.data["step"])  # type: ignore[index]
        return None

    assert wait_for(resumed_from, 120, "the resumed attempt", 0.3) == step
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id
    assert wait_job(client, job.id, ("cancelled",), stack).status == "cancelled"


def test_dpo_job_follows_preferences_and_its_model_serves_completions(
    client: OpenAI, stack: Stack
) -> None:
    pairs = client.files.create(
        file=("pairs.jsonl", io.BytesIO(preference_jsonl(8))), purpose="fine-tune"
    )
    hyperparameters = {"beta": 0.2, "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 100}
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=pairs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": hyperparameters}},
        suffix="dpo",
    )
    assert job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters is not None
    assert job.method.dpo.hyperparameters.beta == 0.2

    done = wait_job(client, job.id, ("succeeded", "failed", "cancelled"), stack)
    assert done.status == "succeeded", done.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    started = next(e for e in events if e.message == "training started")
    assert started.data["objective"] == "dpo"  # type: ignore[index]
    final = next(e for e in events if e.message == "final evaluation")
    assert "rewards/accuracies" in final.data  # type: ignore[operator]

    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
    with stack.client() as ours:
        points = ours.get(f"/v1/jobs/{job.id}/metrics", params={"name": names}).json()["data"]
    steps = {name: [p["step"] for p in points if p["name"] == name] for name in names}
    assert steps == {name: [1, 2] for name in names}  # 8 pairs / batch 4, every step logged
    margins = [p["value"] for p in points if p["name"] == "rewards/margins"]
    assert margins[0] == 0.0 and margins[1] > 0  # the policy moved from its reference

    name = done.fine_tuned_model
    assert name is not None and name.startswith(f"ft:{TINY_MODEL}:dpo:")
    completion = client.completions.create(
        model=name, prompt="Fresh bread", max_tokens=4, temperature=0
    )
    assert completion.model == name
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert isinstance(completion.choices[0].text, str)


def prompts_jsonl(rows: int) -> bytes:
    """OpenAI's reinforcement rows: a prompt, and the answer the grader compares with."""
    lines = []
    for i in range(rows):
        question, answer = CONVERSATIONS[i % len(CONVERSATIONS)]
        lines.append(
            json.dumps({"messages": [{"role": "user", "content": question}], "answer": answer})
        )
    return ("\n".join(lines) + "\n").encode()


def test_reinforcement_job_is_graded_per_step_and_its_model_serves_completions(
    client: OpenAI, stack: Stack
) -> None:
    prompts = client.files.create(
        file=("prompts.jsonl", io.BytesIO(prompts_jsonl(4))), purpose="fine-tune"
    )
    grader = {
        "type": "multi",
        "name": "answer",
        "graders": {
            "has": {
                "type": "string_check",
                "name": "mentions the answer",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "operation": "ilike",
            },
            "close": {
                "type": "text_similarity",
                "name": "close to the answer",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "evaluation_metric": "fuzzy_match",
            },
        },
        "calculate_output": "max(has, close)",
    }
    hyperparameters = {
        "n_epochs": 1,
        "batch_size": 2,
        "learning_rate_multiplier": 100,
        "generations": 2,  # ours, with max_completion_tokens: kept tiny
        "max_completion_tokens": 4,
    }
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=prompts.id,
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": grader, "hyperparameters": hyperparameters},  # type: ignore[typeddict-item]
        },
        suffix="rft",
    )
    assert job.method is not None and job.method.type == "reinforcement"
    assert job.method.reinforcement is not None
    assert job.method.reinforcement.grader.type == "multi"

    done = wait_job(client, job.id, ("succeeded", "failed", "cancelled"), stack)
    assert done.status == "succeeded", done.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    started = next(e for e in events if e.message == "training started")
    assert started.data["objective"] == "reinforcement"  # type: ignore[index]
    final = next(e for e in events if e.message == "final evaluation")
    assert 0.0 <= final.data["reward"] <= 1.0  # type: ignore[index]

    with stack.client() as ours:
        points = ours.get(
            f"/v1/jobs/{job.id}/metrics", params={"name": ["rewards/grader/mean"]}
        ).json()["data"]
    assert [p["step"] for p in points] == [1, 2]  # 4 prompts / batch 2, every step logged
    assert all(0.0 <= p["value"] <= 1.0 for p in points), points

    name = done.fine_tuned_model
    assert name is not None and name.startswith(f"ft:{TINY_MODEL}:rft:")
    completion = client.completions.create(
        model=name, prompt="Fresh bread", max_tokens=4, temperature=0
    )
    assert completion.model == name
    assert completion.usage is not None and completion.usage.completion_tokens > 0
