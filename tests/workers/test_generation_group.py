"""Generation jobs through the production path in-process: the lifecycle claims a job and
hands it to its decode group (workers/generation/jobs.py), which takes in the other ready
jobs on the same model and ends each through its own attempt. Real transformers, a real
database (SQLite and PostgreSQL) and Redis; no worker process (tests/e2e has those)."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from sqlalchemy.exc import OperationalError

from core.dispatch import JobPublisher
from core.enums import JobKind
from core.settings import Settings
from core.token_stream import StreamDelta, parse_entry, stream_key
from db.events import list_events
from db.jobs import create_job, request_cancel
from db.outputs import list_outputs
from db.session import migrate, session_scope
from tests.conftest import TINY_MODEL
from tests.support.generation import register_adapter
from tests.support.harness import wait_for
from tests.support.jobs import load_job
from tests.support.services import redis_db_index
from workers import lifecycle as lifecycle_module
from workers.generation import decode_group
from workers.generation.cache import ModelCache
from workers.generation.jobs import JOINED_MESSAGE
from workers.lifecycle import JobLifecycle

Texts = list[tuple[int, int, str, str]]


@pytest.fixture(scope="module")
def settings(
    database_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    migrate(database_url)
    data = Path(tmp_path_factory.mktemp("data"))
    shutil.copytree(tiny_model_dir, data / "models" / TINY_MODEL)
    with redis_db_index() as broker:
        yield Settings(
            data_dir=data,
            database_url=database_url,
            broker_url=broker,
            heartbeat_interval_s=0.05,
            db_retry_s=0.2,
            device="cpu",
        )


@pytest.fixture(scope="module", autouse=True)
def own_model_cache() -> Iterator[None]:
    """The model cache is one per process; this module's models live in its own data dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("workers.generation.engine._process_cache", lru_cache(maxsize=1)(ModelCache))
        yield


@pytest.fixture
def lifecycle(settings: Settings) -> Iterator[JobLifecycle]:
    publisher = JobPublisher(settings)
    yield JobLifecycle(settings, publisher, "cpu")
    publisher.close()


def submit(settings: Settings, model: str = TINY_MODEL, **spec: Any) -> str:
    with session_scope(settings.database_url) as s:
        return create_job(
            s,
            kind=JobKind.GENERATE,
            spec={"model": model, "prompts": ["The blue mug"], **spec},
            priority=0,
            max_attempts=3,
            metadata={},
            model=TINY_MODEL,
        ).id


def texts(settings: Settings, job_id: str) -> Texts:
    with session_scope(settings.database_url) as s:
        return [
            (o.prompt_index, o.sequence_index, o.text, o.finish_reason)
            for o in list_outputs(s, job_id)
        ]


def messages(settings: Settings, job_id: str) -> list[str]:
    with session_scope(settings.database_url) as s:
        return [e.message for e in list_events(s, job_id)]


def streamed(settings: Settings, job_id: str) -> dict[tuple[int, int], str]:
    """The text of each sequence as the token stream delivered it, checking the attempt."""
    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    try:
        raw = client.xrange(stream_key(job_id))
    finally:
        client.close()
    out: dict[tuple[int, int], str] = {}
    for entry_id, fields in raw:
        entry = parse_entry(entry_id, fields)
        assert entry is not None and entry.attempt == 1
        if isinstance(entry, StreamDelta):
            key = (entry.prompt_index, entry.sequence_index)
            out[key] = out.get(key, "") + entry.text
    return out


SPECS: list[dict[str, Any]] = [
    {"prompts": ["The blue mug", "Fresh bread"], "temperature": 0, "max_new_tokens": 30},
    {"temperature": 0.8, "top_k": 20, "seed": 3, "max_new_tokens": 25, "stop": ["e"]},
    {"temperature": 1.2, "top_p": 0.9, "seed": 8, "num_return_sequences": 2},
]


def test_jobs_decoded_together_give_their_alone_texts(
    settings: Settings, lifecycle: JobLifecycle
) -> None:
    alone = []
    for i, spec in enumerate(SPECS):
        job_id = submit(settings, **spec)
        lifecycle.execute(job_id)
        job = load_job(settings.database_url, job_id)
        assert job.status == "succeeded", job.error_message
        assert job.result is not None
        assert job.result["model_cache"] == ("miss" if i == 0 else "hit")
        alone.append(texts(settings, job_id))
    first_alone = messages(settings, job_id)
    assert any(m.startswith(f"model {settings.models_dir / TINY_MODEL}") for m in first_alone)

    jobs = [submit(settings, **spec) for spec in SPECS]
    lifecycle.execute(jobs[0])  # one message; the other two join its decode group
    for job_id, want in zip(jobs, alone, strict=True):
        job = load_job(settings.database_url, job_id)
        assert (job.status, job.attempts, job.progress) == ("succeeded", 1, 1.0)
        assert job.result is not None and job.result["usage"]["completion_tokens"] > 0
        assert texts(settings, job_id) == want
        assert streamed(settings, job_id) == {(p, s): text for p, s, text, _ in want}
    assert [JOINED_MESSAGE in messages(settings, j) for j in jobs] == [False, True, True]


def test_a_database_error_recording_one_job_leaves_the_others(
    settings: Settings, lifecycle: JobLifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [submit(settings, temperature=0, max_new_tokens=10 + 5 * i) for i in range(3)]
    real_add_outputs = lifecycle_module.add_outputs

    def add_outputs(session: Any, job_id: str, outputs: Any) -> None:
        if job_id == jobs[1]:
            raise OperationalError("INSERT INTO outputs", {}, Exception("connection reset"))
        real_add_outputs(session, job_id, outputs)

    monkeypatch.setattr(lifecycle_module, "add_outputs", add_outputs)
    lifecycle.execute(jobs[0])
    statuses = [load_job(settings.database_url, j).status for j in jobs]
    # the unrecorded job stays running; its lease runs out and the reconciler takes it up
    assert statuses == ["succeeded", "running", "succeeded"]
    assert texts(settings, jobs[1]) == []
    assert all(texts(settings, j) for j in (jobs[0], jobs[2]))


def test_a_bad_adapter_fails_its_job_alone(settings: Settings, lifecycle: JobLifecycle) -> None:
    broken = settings.data_dir / "models" / "broken-adapter"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")
    name = f"ft:{TINY_MODEL}:broken:00000001"
    register_adapter(settings, name, "models/broken-adapter")
    good = submit(settings, temperature=0, max_new_tokens=20)
    bad = submit(settings, model=name, temperature=0, max_new_tokens=20)
    other = submit(settings, temperature=0, max_new_tokens=20, prompts=["Fresh bread"])
    lifecycle.execute(good)
    failed = load_job(settings.database_url, bad)
    assert failed.status == "failed"
    assert failed.error_type == "model_not_found", failed.error_message
    assert "broken-adapter" in (failed.error_message or ""), failed.error_message
    assert [load_job(settings.database_url, j).status for j in (good, other)] == ["succeeded"] * 2


def test_out_of_memory_fails_the_newest_job_alone_by_policy(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = decode_group.DecodeGroup.step

    def step(self: decode_group.DecodeGroup) -> list[decode_group.Row]:
        if len(self) > 1:  # a device too small for two sequences at once
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real_step(self)

    monkeypatch.setattr(decode_group.DecodeGroup, "step", step)
    for retry, ended in [(False, "failed"), (True, "queued")]:
        policy = settings.model_copy(update={"retry_out_of_memory": retry})
        publisher = JobPublisher(policy)
        try:
            first = submit(settings, temperature=0, max_new_tokens=15)
            newest = submit(settings, temperature=0, max_new_tokens=15, prompts=["Fresh bread"])
            JobLifecycle(policy, publisher, "cpu").execute(first)
        finally:
            publisher.close()
        assert load_job(settings.database_url, first).status == "succeeded"
        job = load_job(settings.database_url, newest)
        assert (job.status, job.error_type) == (ended, "out_of_memory")


def test_an_unknown_model_fails_permanently(settings: Settings, lifecycle: JobLifecycle) -> None:
    job_id = submit(settings, model="no-such-model-here")
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.error_type, job.attempts) == ("failed", "model_not_found", 1)


def test_a_cancel_notice_stops_a_decoding_job_long_before_its_heartbeat(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    slow_beat = settings.model_copy(update={"heartbeat_interval_s": 60.0, "lease_ttl_s": 120.0})
    publisher = JobPublisher(slow_beat)
    lifecycle = JobLifecycle(slow_beat, publisher, "cpu")
    job_id = submit(slow_beat, temperature=0, max_new_tokens=4000)
    runner = threading.Thread(target=lifecycle.execute, args=(job_id,))
    caplog.set_level(logging.INFO, logger="workers.generation.jobs")
    runner.start()
    try:
        wait_for(lambda: streamed(slow_beat, job_id), 30, "the job's first tokens")
        with session_scope(slow_beat.database_url) as s:
            request_cancel(s, job_id, tenant_id=None)
        publisher.notify_cancel(job_id)
        runner.join(timeout=30)
        assert not runner.is_alive()
    finally:
        runner.join()
        publisher.close()
    job = load_job(slow_beat.database_url, job_id)
    assert job.status == "cancelled"
    assert "cancel noticed between decoding steps" in caplog.text
    assert texts(slow_beat, job_id) == []
