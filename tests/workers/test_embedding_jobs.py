"""Embedding jobs through the production path in-process: the lifecycle claims one job and
hands it to workers/embedding/jobs.py, which claims the other ready embed jobs on the same
model, encodes their inputs together and ends each through its own attempt. A real tiny
encoder, a real database (SQLite and PostgreSQL) and Redis; no worker process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from core.dispatch import JobPublisher
from core.embeddings import EMBEDDING_KEY, base64_to_vector
from core.enums import JobKind
from core.settings import Settings
from core.token_stream import StreamEnd, StreamStart, parse_entry, stream_key
from db.jobs import create_job
from db.outputs import list_outputs
from db.session import migrate, session_scope
from tests.support.jobs import load_job
from tests.support.services import redis_db_index
from tests.support.tiny_encoder import TINY_ENCODER, build_tiny_encoder, reference_embeddings
from workers.lifecycle import JobLifecycle


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    migrate(database_url)
    data = Path(tmp_path_factory.mktemp("data"))
    build_tiny_encoder(data / "models" / TINY_ENCODER)
    with redis_db_index() as broker:
        yield Settings(
            data_dir=data,
            database_url=database_url,
            broker_url=broker,
            heartbeat_interval_s=0.05,
            db_retry_s=0.2,
            device="cpu",
            embedding_batch_size=4,
        )


@pytest.fixture
def lifecycle(settings: Settings) -> Iterator[JobLifecycle]:
    publisher = JobPublisher(settings)
    yield JobLifecycle(settings, publisher, "cpu")
    publisher.close()


def submit(settings: Settings, inputs: list[Any], **spec: Any) -> str:
    with session_scope(settings.database_url) as s:
        return create_job(
            s,
            kind=JobKind.EMBED,
            spec={"model": TINY_ENCODER, "input": inputs, **spec},
            priority=0,
            max_attempts=3,
            metadata={},
            model=TINY_ENCODER,
        ).id


def vectors(settings: Settings, job_id: str) -> list[list[float]]:
    with session_scope(settings.database_url) as s:
        rows = list_outputs(s, job_id)
        assert [o.prompt_index for o in rows] == list(range(len(rows)))
        return [base64_to_vector((o.data or {})[EMBEDDING_KEY]) for o in rows]


def stream(settings: Settings, job_id: str) -> list[Any]:
    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    try:
        return [parse_entry(i, f) for i, f in client.xrange(stream_key(job_id))]
    finally:
        client.close()


TEXTS = [
    ["Ada Lovelace wrote the first program while living in London."],
    ["The service was quick.", "My parcel arrived late and the box was damaged badly."],
    ["Marie Curie won two Nobel prizes and lived in Paris.", "We met Linus.", "quiet"],
]


def test_ready_jobs_on_the_model_are_encoded_together_and_match_each_alone(
    settings: Settings, lifecycle: JobLifecycle
) -> None:
    model_dir = settings.models_dir / TINY_ENCODER
    jobs = [submit(settings, texts) for texts in TEXTS]
    lifecycle.execute(jobs[0])  # one message; the other two are claimed to join it
    for job_id, texts in zip(jobs, TEXTS, strict=True):
        job = load_job(settings.database_url, job_id)
        assert (job.status, job.attempts) == ("succeeded", 1), job.error_message
        assert job.result is not None
        batch = job.result["batch"]
        # six inputs, four per pass: two passes, each job in at least one with another's
        assert (batch["jobs"], batch["inputs"], batch["passes"]) == (3, 6, 2)
        assert batch["job_passes"] >= batch["shared_passes"] >= 1
        assert job.result["dimensions"] == 32
        assert job.result["usage"]["prompt_tokens"] == job.result["usage"]["total_tokens"] > 0
        got = np.array(vectors(settings, job_id))
        np.testing.assert_allclose(got, reference_embeddings(model_dir, texts), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        entries = stream(settings, job_id)
        assert isinstance(entries[0], StreamStart) and entries[0].attempt == 1
        assert isinstance(entries[-1], StreamEnd) and entries[-1].status == "succeeded"
    with session_scope(settings.database_url) as s:
        tokens = sum(o.prompt_tokens for o in list_outputs(s, jobs[1]))
    assert load_job(settings.database_url, jobs[1]).result["usage"]["prompt_tokens"] == tokens


def test_token_ids_embed_as_the_text_they_encode(
    settings: Settings, lifecycle: JobLifecycle
) -> None:
    from transformers import AutoTokenizer

    model_dir = settings.models_dir / TINY_ENCODER
    ids = AutoTokenizer.from_pretrained(model_dir)(["the hotel room was clean"])["input_ids"]
    by_text = submit(settings, ["the hotel room was clean"])
    by_ids = submit(settings, ids)
    lifecycle.execute(by_ids)
    assert [load_job(settings.database_url, j).status for j in (by_text, by_ids)] == [
        "succeeded"
    ] * 2
    np.testing.assert_allclose(vectors(settings, by_ids), vectors(settings, by_text), atol=1e-5)


def test_a_job_the_model_cannot_take_fails_alone(
    settings: Settings, lifecycle: JobLifecycle
) -> None:
    good = submit(settings, ["fine"])
    too_long = submit(settings, [[5] * 600])  # the tiny encoder has 512 positions
    past_vocab = submit(settings, [[10**6]])
    wide = submit(settings, ["fine"], dimensions=8)
    other = submit(settings, ["also fine"])
    lifecycle.execute(good)
    failed = {j: load_job(settings.database_url, j) for j in (too_long, past_vocab, wide)}
    assert {j.status for j in failed.values()} == {"failed"}
    assert {j.error_type for j in failed.values()} == {"invalid_spec"}
    assert "input[0] has 600 tokens" in (failed[too_long].error_message or "")
    assert "vocabulary" in (failed[past_vocab].error_message or "")
    assert "dimensions" in (failed[wide].error_message or "")
    assert isinstance(stream(settings, too_long)[-1], StreamEnd)
    for job_id in (good, other):
        job = load_job(settings.database_url, job_id)
        assert job.status == "succeeded" and job.result is not None
        assert job.result["batch"]["jobs"] == 2


def test_an_unloadable_model_fails_its_job_with_model_not_found(
    settings: Settings, lifecycle: JobLifecycle
) -> None:
    broken = settings.models_dir / "broken-encoder"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "config.json").write_text('{"model_type": "bert"}')  # and no weights
    with session_scope(settings.database_url) as s:
        job_id = create_job(
            s,
            kind=JobKind.EMBED,
            spec={"model": "broken-encoder", "input": ["x"]},
            priority=0,
            max_attempts=3,
            metadata={},
            model="broken-encoder",
        ).id
    lifecycle.execute(job_id)
    job = load_job(settings.database_url, job_id)
    assert (job.status, job.error_type) == ("failed", "model_not_found"), job.error_message
    assert isinstance(stream(settings, job_id)[-1], StreamEnd)
