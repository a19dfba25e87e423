"""The batch runner, the executor running it, and the reconciler expiring queued batches,
in-process on the tiny GPT-2 with a real database (SQLite and PostgreSQL) and Redis."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from transformers import AutoTokenizer

from core.datasets import parse_dataset
from core.dispatch import JobPublisher
from core.enums import FailureType, JobKind, JobStatus
from core.errors import JobExpired, JobStopped
from core.settings import Settings
from db.attempts import retry_attempt
from db.base import utcnow
from db.batch import expire_running, store_lines
from db.datasets import create_dataset
from db.jobs import claim_job, create_job, request_cancel
from db.models import Job, Output
from db.outputs import OutputRecord, list_outputs
from db.session import migrate, session_scope
from tests.conftest import TINY_MODEL
from tests.support.harness import wait_for
from tests.support.jobs import insert_job, load_job
from tests.support.services import redis_db_index
from workers.batch.lines import stored_error, stored_output
from workers.batch.runner import BatchRunner
from workers.context import RunContext
from workers.generation.cache import ModelCache
from workers.lifecycle import JobLifecycle
from workers.reconciler import reconcile

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
CHAT_MODEL = "tiny-chat"
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": COMPLETIONS,
        "body": {"model": TINY_MODEL, "prompt": f"The blue mug {custom_id}", **body},
    }


MIXED = [
    line("greedy", max_tokens=4, temperature=0),
    line("two-choices", max_tokens=3, n=2, temperature=0.8, seed=1),
    line("bad-params", n=3, temperature=0),
    line("stop", max_tokens=5, temperature=0, stop="\n"),
    line("no-such-model", model="no-such-model", max_tokens=2),
]


@pytest.fixture(scope="module")
def settings(
    database_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    migrate(database_url)
    data = Path(tmp_path_factory.mktemp("data"))
    shutil.copytree(tiny_model_dir, data / "models" / TINY_MODEL)
    chat_dir = data / "models" / CHAT_MODEL
    shutil.copytree(tiny_model_dir, chat_dir)
    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(chat_dir))
    with redis_db_index() as broker:
        yield Settings(
            data_dir=data,
            database_url=database_url,
            broker_url=broker,
            heartbeat_interval_s=0.05,
            batch_chunk_lines=2,
            device="cpu",
        )


@pytest.fixture(scope="module", autouse=True)
def own_engine() -> Iterator[None]:
    """The model cache is one per process (a worker has one data dir); this module's models
    are in its own data dir, so it gets a cache of its own, and the modules after it do not
    inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("workers.generation.engine._process_cache", lru_cache(maxsize=1)(ModelCache))
        yield


def store_dataset(settings: Settings, rows: list[dict[str, Any]]) -> str:
    """Validate and store a batch file the way POST /v1/datasets does."""
    raw = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    parsed = parse_dataset(raw, "batch.jsonl")
    dataset_id = "ds_" + hashlib.md5(raw + str(utcnow()).encode()).hexdigest()
    relative = f"datasets/{dataset_id}/data.jsonl"
    (settings.data_dir / relative).parent.mkdir(parents=True)
    (settings.data_dir / relative).write_bytes(raw)
    with session_scope(settings.database_url) as s:
        create_dataset(
            s,
            dataset_id=dataset_id,
            filename="batch.jsonl",
            format="jsonl",
            schema=parsed.schema.value,
            rows=len(parsed.rows),
            labels=[],
            sha256=hashlib.sha256(raw).hexdigest(),
            size_bytes=len(raw),
            path=relative,
            report=parsed.report,
        )
    return dataset_id


def batch_spec(dataset_id: str, window: str, endpoint: str) -> dict[str, Any]:
    return {"input_dataset": dataset_id, "endpoint": endpoint, "completion_window": window}


def new_batch(settings: Settings, rows: list[dict[str, Any]], window: str = "1h") -> str:
    with session_scope(settings.database_url) as s:
        return create_job(
            s,
            kind=JobKind.BATCH,
            spec=batch_spec(store_dataset(settings, rows), window, rows[0]["url"]),
            priority=0,
            max_attempts=3,
            metadata={},
        ).id


def claimed_batch(settings: Settings, rows: list[dict[str, Any]], worker: str = "w1") -> str:
    job_id = new_batch(settings, rows)
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job_id, worker, timedelta(seconds=60))
    return job_id


def stored(settings: Settings, job_id: str) -> dict[str, dict[str, Any]]:
    """custom_id -> stored line, checking one row per line at sequence 0."""
    with session_scope(settings.database_url) as s:
        rows = list_outputs(s, job_id)
    lines: dict[str, dict[str, Any]] = {}
    for r in rows:
        assert r.sequence_index == 0 and r.data is not None
        lines[r.data["custom_id"]] = {"index": r.prompt_index, "text": r.text, **r.data}
    return lines


def run(settings: Settings, job_id: str, attempt: int = 1, **kwargs: Any) -> RunContext:
    ctx = RunContext(job_id=job_id, attempt=attempt, device="cpu", worker="w1")
    job = load_job(settings.database_url, job_id)
    result = BatchRunner(settings, **kwargs).run(dict(job.spec), ctx)
    assert result.outputs == []
    assert result.result == {"request_counts": ctx.detail["request_counts"]}
    return ctx


def test_every_line_ends_as_an_output_or_its_own_error(settings: Settings) -> None:
    job_id = claimed_batch(settings, MIXED)
    ctx = run(settings, job_id)
    assert ctx.progress == 1.0
    assert ctx.detail["request_counts"] == {"total": 5, "completed": 3, "failed": 2}
    lines = stored(settings, job_id)
    assert [lines[r["custom_id"]]["index"] for r in MIXED] == [0, 1, 2, 3, 4]
    greedy = lines["greedy"]["response"]["body"]
    assert greedy["object"] == "text_completion" and greedy["model"] == TINY_MODEL
    assert greedy["choices"][0]["text"] == lines["greedy"]["text"] != ""
    assert greedy["usage"]["completion_tokens"] == 4
    two = lines["two-choices"]["response"]["body"]
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["usage"]["completion_tokens"] == 6
    assert "\n" not in lines["stop"]["response"]["body"]["choices"][0]["text"]
    bad = lines["bad-params"]
    assert bad["response"] is None and bad["error"]["code"] == "invalid_request"
    assert "temperature" in bad["error"]["message"]
    assert lines["no-such-model"]["error"]["code"] == "model_not_found"


def test_chat_lines_answer_with_chat_completions(settings: Settings) -> None:
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rows = [
        {
            "custom_id": "chat",
            "method": "POST",
            "url": CHAT,
            "body": {"model": CHAT_MODEL, "messages": messages, "max_completion_tokens": 3, "n": 2},
        },
        {
            "custom_id": "no-template",
            "method": "POST",
            "url": CHAT,
            "body": {"model": TINY_MODEL, "messages": messages, "max_tokens": 3},
        },
    ]
    job_id = claimed_batch(settings, rows)
    ctx = run(settings, job_id)
    assert ctx.detail["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    lines = stored(settings, job_id)
    body = lines["chat"]["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == CHAT_MODEL
    assert [c["message"]["role"] for c in body["choices"]] == ["assistant", "assistant"]
    assert body["choices"][0]["message"]["content"] == lines["chat"]["text"]
    assert body["usage"]["completion_tokens"] == 6
    assert lines["no-template"]["error"]["code"] == "invalid_spec"
    assert "chat template" in lines["no-template"]["error"]["message"]


def test_lines_with_logprobs_answer_them_in_their_endpoints_shape(settings: Settings) -> None:
    rows = [line("lp", max_tokens=4, temperature=0, logprobs=2), line("plain", max_tokens=4)]
    job_id = claimed_batch(settings, rows)
    run(settings, job_id)
    lines = stored(settings, job_id)
    choice = lines["lp"]["response"]["body"]["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 4
    assert all(
        token in top
        for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True)
    )
    assert logprobs["text_offset"][0] == 0
    assert lines["plain"]["response"]["body"]["choices"][0]["logprobs"] is None


def test_a_retried_attempt_skips_stored_lines(settings: Settings) -> None:
    rows = MIXED[:2]
    job_id = claimed_batch(settings, rows)
    earlier = stored_output(0, rows[0], [OutputRecord(0, 0, "from attempt 1", "length", 5, 4)])
    with session_scope(settings.database_url) as s:
        assert store_lines(s, job_id, 1, [earlier])
    ctx = run(settings, job_id)
    assert ctx.detail["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    lines = stored(settings, job_id)
    assert lines["greedy"]["text"] == "from attempt 1"
    assert lines["two-choices"]["error"] is None


def test_only_the_live_attempt_writes(settings: Settings) -> None:
    job_id = claimed_batch(settings, MIXED[:1], worker="w1")
    with pytest.raises(JobStopped):
        run(settings, job_id, attempt=2)  # the job is at attempt 1: a stale or forged token
    with session_scope(settings.database_url) as s:
        assert not store_lines(s, job_id, 0, [stored_error(0, "greedy", "x", "stale")])
    assert stored(settings, job_id) == {}
    assert load_job(settings.database_url, job_id).status == "running"


def test_a_stale_attempt_cannot_expire_the_job(settings: Settings) -> None:
    job_id = claimed_batch(settings, MIXED[:1])
    with session_scope(settings.database_url) as s:
        assert not expire_running(s, job_id, 2, [], result={}, message="stale")
    assert load_job(settings.database_url, job_id).status == "running"


def test_window_passing_between_chunks_expires_the_rest(settings: Settings) -> None:
    job_id = claimed_batch(settings, MIXED)
    created = load_job(settings.database_url, job_id).created_at
    times = iter([created, created + timedelta(hours=2)])

    def clock() -> datetime:
        return next(times)

    with pytest.raises(JobExpired):
        run(settings, job_id, clock=clock)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.error_type, job.lease_owner) == ("expired", "batch_expired", None)
    assert job.result == {"request_counts": {"total": 5, "completed": 2, "failed": 3}}
    lines = stored(settings, job_id)
    assert lines["greedy"]["error"] is None and lines["two-choices"]["error"] is None
    expired = [r["custom_id"] for r in MIXED[2:]]
    assert [lines[c]["error"]["code"] for c in expired] == ["batch_expired"] * 3


@pytest.fixture
def executor(settings: Settings) -> Iterator[JobLifecycle]:
    publisher = JobPublisher(settings)
    yield JobLifecycle(settings, publisher, "cpu")
    publisher.close()


def test_executor_runs_a_batch_to_succeeded(settings: Settings, executor: JobLifecycle) -> None:
    job_id = new_batch(settings, MIXED[:2])
    executor.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.attempts, job.progress) == ("succeeded", 1, 1.0)
    assert job.result == {"request_counts": {"total": 2, "completed": 2, "failed": 0}}
    assert len(stored(settings, job_id)) == 2


def test_executor_claiming_after_the_window_expires_every_line(
    settings: Settings, executor: JobLifecycle
) -> None:
    job_id = new_batch(settings, MIXED[:3], window="5s")
    with session_scope(settings.database_url) as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(created_at=utcnow() - timedelta(seconds=10))
        )
    executor.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.attempts) == ("expired", 1)
    lines = stored(settings, job_id)
    assert {c: v["error"]["code"] for c, v in lines.items()} == {
        "greedy": "batch_expired",
        "two-choices": "batch_expired",
        "bad-params": "batch_expired",
    }


def test_cancel_keeps_finished_lines(settings: Settings, executor: JobLifecycle) -> None:
    # one short line, stored while the long ones are still decoding; then the cancel
    rows = [line("short", max_tokens=16, temperature=0)]
    rows += [line(f"long-{i}", max_tokens=2000, temperature=0) for i in range(7)]
    job_id = new_batch(settings, rows)

    def cancel_after_first_line() -> None:
        def first_line_stored() -> bool:
            with session_scope(settings.database_url) as s:
                return s.query(Output).filter(Output.job_id == job_id).count() > 0

        wait_for(first_line_stored, 240, "a first stored line")
        with session_scope(settings.database_url) as s:
            request_cancel(s, job_id, tenant_id=None)

    canceller = threading.Thread(target=cancel_after_first_line)
    canceller.start()
    executor.execute(job_id)
    canceller.join()
    job = load_job(settings.database_url, job_id)
    assert job.status == "cancelled"
    lines = stored(settings, job_id)
    assert 1 <= len(lines) < len(rows)
    assert all(v["error"] is None and v["text"] for v in lines.values())


def test_reconciler_expires_queued_batches_past_their_window(settings: Settings) -> None:
    overdue = new_batch(settings, MIXED[:3], window="5s")
    fresh = new_batch(settings, MIXED[:3], window="1h")
    generate = insert_job(settings.database_url)
    requeued = claimed_batch(settings, MIXED[:3])
    earlier = stored_output(0, MIXED[0], [OutputRecord(0, 0, "kept", "length", 5, 4)])
    with session_scope(settings.database_url) as s:
        assert store_lines(s, requeued, 1, [earlier])
        s.execute(
            update(Job)
            .where(Job.id.in_([overdue, requeued, generate]))
            .values(created_at=utcnow() - timedelta(hours=2))
        )
        assert (
            retry_attempt(
                s,
                requeued,
                attempt=1,
                delay_s=0.0,
                failure=FailureType.WORKER_LOST,
                message="worker lost",
            )
            is JobStatus.QUEUED
        )
    publisher = JobPublisher(settings)
    try:
        report = reconcile(settings, publisher)
    finally:
        publisher.close()
    assert report.expired == 2
    job = load_job(settings.database_url, overdue)
    assert (job.status, job.attempts, job.started_at) == ("expired", 0, None)
    assert job.result == {"request_counts": {"total": 3, "completed": 0, "failed": 3}}
    assert {v["error"]["code"] for v in stored(settings, overdue).values()} == {"batch_expired"}
    again = load_job(settings.database_url, requeued)
    assert again.status == "expired"
    assert again.result == {"request_counts": {"total": 3, "completed": 1, "failed": 2}}
    kept = stored(settings, requeued)
    assert kept["greedy"]["text"] == "kept" and kept["greedy"]["error"] is None
    assert load_job(settings.database_url, fresh).status == "queued"
    assert load_job(settings.database_url, generate).status == "queued"
    assert stored(settings, fresh) == {}
