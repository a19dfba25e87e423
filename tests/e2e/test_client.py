"""`modelyard.client.Client` drives whole job lifecycles against a real stack."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelyard.client import (
    AsyncClient,
    Client,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
)
from tests.conftest import TINY_MODEL
from tests.support.harness import Stack
from tests.support.services import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# The HTTP and command-line surface is the same on every backend; the repositories under
# it run on SQLite and PostgreSQL in tests/api and tests/e2e/test_spine.py.
BACKENDS = ["postgresql"]


def test_a_generation_job_from_submit_to_outputs(one_worker: Stack) -> None:
    with Client(one_worker.base_url, api_key=one_worker.api_key) as client:
        key = uuid.uuid4().hex
        spec = {"model": TINY_MODEL, "prompts": ["The blue mug"], "max_new_tokens": 6}
        job = client.submit("generate", spec, idempotency_key=key, metadata={"ticket": "T-1"})
        again = client.submit("generate", spec, idempotency_key=key, metadata={"ticket": "T-1"})
        assert again["id"] == job["id"]  # a retried submit never makes a second job
        seen = list(client.iter_events(job["id"]))
        statuses = [e["data"]["status"] for e in seen if e["type"] == "status"]
        assert statuses[0] == "queued" and statuses[-1] == "succeeded"
        assert [e["id"] for e in seen] == sorted(e["id"] for e in seen)
        done = client.wait(job["id"], timeout=60)
        assert done["status"] == "succeeded"
        (output,) = client.outputs(job["id"])
        assert output["completion_tokens"] >= 1
        tokens = list(client.stream_tokens(job["id"]))
        assert tokens[-1]["event"] == "done" and tokens[-1]["data"]["status"] == "succeeded"
        text = "".join(t["data"]["text"] for t in tokens if t["event"] == "token")
        assert text == output["text"]
        assert job["id"] in {j["id"] for j in client.iter_jobs(kind="generate", limit=1)}


def test_typed_errors_and_datasets(one_worker: Stack, tmp_path: Path) -> None:
    with Client(one_worker.base_url, api_key=one_worker.api_key) as client:
        with pytest.raises(NotFoundError) as missing:
            client.get("job_missing")
        assert missing.value.status_code == 404 and missing.value.type == "not_found"
        with pytest.raises(InvalidRequestError) as invalid:
            client.submit("generate", {"model": TINY_MODEL, "prompts": []})
        assert invalid.value.status_code == 422 and invalid.value.param
        finished = client.wait(client.submit("noop", {})["id"], timeout=60)
        with pytest.raises(ConflictError):
            client.cancel(finished["id"])
        data = tmp_path / "reviews.csv"
        data.write_text("text,label\ngreat mug,pos\nbroken handle,neg\n")
        uploaded = client.upload_dataset(data)
        assert client.dataset(uploaded["id"])["rows"] == 2
        assert uploaded["id"] in {d["id"] for d in client.datasets()["data"]}
        client.delete_dataset(uploaded["id"])
        with pytest.raises(NotFoundError):
            client.dataset(uploaded["id"])


def test_reads_retry_then_give_up_when_nothing_listens() -> None:
    client = Client(f"http://127.0.0.1:{free_port()}", retries=1)
    with client, pytest.raises(httpx.ConnectError):
        client.get("job_x")


def test_the_async_client_drives_the_same_lifecycle(one_worker: Stack) -> None:
    async def lifecycle() -> tuple[list[dict[str, Any]], dict[str, Any], list[Any], str]:
        async with AsyncClient(one_worker.base_url, api_key=one_worker.api_key) as client:
            spec = {"model": TINY_MODEL, "prompts": ["The blue mug"], "max_new_tokens": 4}
            job = await client.submit("generate", spec)
            seen = [event async for event in client.iter_events(job["id"])]
            done = await client.wait(job["id"], timeout=60)
            outputs = await client.outputs(job["id"])
            tokens = [m async for m in client.stream_tokens(job["id"])]
            text = "".join(t["data"]["text"] for t in tokens if t["event"] == "token")
            assert text == outputs[0]["text"]
            try:
                await client.cancel(done["id"])
            except ConflictError as refused:
                error = refused.type
            return seen, done, outputs, error

    seen, done, outputs, error = asyncio.run(lifecycle())
    statuses = [e["data"]["status"] for e in seen if e["type"] == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded"
    assert done["status"] == "succeeded" and outputs[0]["completion_tokens"] >= 1
    assert error == "invalid_state"


def test_the_async_client_raises_typed_errors_and_gives_up_when_nothing_listens(
    one_worker: Stack,
) -> None:
    async def missing() -> NotFoundError:
        async with AsyncClient(one_worker.base_url, api_key=one_worker.api_key) as client:
            try:
                await client.get("job_missing")
            except NotFoundError as error:
                return error
        raise AssertionError("no error")

    assert asyncio.run(missing()).status_code == 404

    async def unreachable() -> None:
        async with AsyncClient(f"http://127.0.0.1:{free_port()}", retries=1) as client:
            await client.get("job_x")

    with pytest.raises(httpx.ConnectError):
        asyncio.run(unreachable())
