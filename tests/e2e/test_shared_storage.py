"""Workers on other hosts: each process has its own data dir and they share artifacts only
through `MODELYARD_STORAGE_URL` (here a file:// store standing in for S3).

The API (host A) takes the upload; a worker on host B, which has neither the dataset nor
the base model, fine-tunes; a worker on host C, which has nothing, serves the registered
model. Runs on PostgreSQL only: the database is shared by every host, and a SQLite file
under one host's data dir is not.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL
from tests.support.datasets import write_text_jsonl
from tests.support.harness import Stack
from tests.support.services import RedisServer, postgres_database

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def hosts(
    broker: RedisServer, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Path]]:
    root = tmp_path_factory.mktemp("hosts")
    shared = root / "shared"
    # The operator puts base models in the shared store, not on any one host.
    shutil.copytree(tiny_model_dir, shared / "models" / TINY_MODEL)
    with postgres_database() as url:
        stack = Stack(root / "a", url, broker.url, storage_url=f"file://{shared}")
        try:
            stack.start_api()
            yield stack, shared
        finally:
            stack.stop()


def test_a_model_trained_on_one_host_is_served_from_another(
    hosts: tuple[Stack, Path], tmp_path: Path
) -> None:
    stack, shared = hosts
    with stack.client() as c, write_text_jsonl(tmp_path / "corpus.jsonl").open("rb") as fh:
        uploaded = c.post("/v1/datasets", files={"file": ("corpus.jsonl", fh)})
    assert uploaded.status_code == 201, uploaded.text
    host_b, host_c = stack.workdir / "b", stack.workdir / "c"
    stack.start_worker(env={"MODELYARD_DATA_DIR": str(host_b)})
    with stack.client() as c:
        spec = {
            "base_model": TINY_MODEL,
            "task": "causal_lm",
            "training_dataset": uploaded.json()["id"],
            "hyperparameters": {"max_steps": 4, "batch_size": 8, "checkpoint_steps": 2},
        }
        r = c.post("/v1/jobs", json={"kind": "finetune", "spec": spec})
    assert r.status_code == 202, r.text
    trained = stack.wait_status(r.json()["id"], ("succeeded", "failed"), timeout=120)
    assert trained["status"] == "succeeded", f"{trained}\n{stack.logs()}"
    assert (host_b / "models" / TINY_MODEL / "config.json").is_file()  # fetched by B
    stack.stop_workers()

    (job_dir,) = shared.rglob(trained["id"])  # the job's artifacts, published by B
    assert sorted(p.name for p in job_dir.rglob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [p for p in job_dir.rglob("config.json") if "checkpoint" not in str(p)]
    assert not list(host_c.rglob(trained["id"]))

    stack.start_worker(env={"MODELYARD_DATA_DIR": str(host_c)})
    spec = {"model": trained["result"]["model"], "prompts": ["The blue"], "max_new_tokens": 4}
    job = stack.submit({**spec, "temperature": 0})
    done = stack.wait_status(job["id"], ("succeeded", "failed"), timeout=60)
    assert done["status"] == "succeeded", f"{done}\n{stack.logs()}"
    assert stack.outputs(job["id"])[0]["completion_tokens"] == 4
    (fetched,) = host_c.rglob(trained["id"])  # fetched by C
    assert list(fetched.rglob("*.safetensors"))
    assert not list(host_c.rglob("*.partial"))
