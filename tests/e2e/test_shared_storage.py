"""Workers on other hosts: each process has its own data dir and they share artifacts only
through `MODELYARD_STORAGE_URL`: an S3 bucket on a real S3 server (moto over HTTP,
tests/support/s3.py) reached through s3fs. A file:// store goes through the same fsspec
calls of core/storage.py (tests/unit/test_storage.py); one store here keeps the module
to two worker starts.

The API (host A) takes the uploads; a worker on host B, which has neither the datasets nor
the base models, fine-tunes; a worker on host C, which has nothing, serves the registered
models (generation and prediction) and finishes a fine-tune that B handed back when it
shut down mid training, from the checkpoint B published.
Runs on PostgreSQL only: the database is shared by every host, and a SQLite file under
one host's data dir is not.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest

from core.storage import ArtifactStore
from tests.conftest import TINY_MODEL
from tests.e2e.test_finetune import upload
from tests.support.datasets import write_sentiment_csv, write_text_jsonl
from tests.support.harness import Stack, wait_for
from tests.support.s3 import moto_s3_store
from tests.support.services import RedisServer, postgres_database

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLS_MODEL = "tiny-bert-cls"
DONE = ("succeeded", "failed", "cancelled")


@dataclass
class Shared:
    """The shared store as the operator configured it, and what is in it."""

    url: str
    options: dict[str, str] = field(default_factory=dict)

    def files(self) -> list[str]:
        """Every file in the store, as a path relative to the store's root."""
        fs, base = fsspec.core.url_to_fs(self.url, **self.options)
        fs.invalidate_cache()
        base = base.rstrip("/")
        return sorted(name.removeprefix(base + "/") for name in fs.find(base))

    def of_job(self, job_id: str) -> list[str]:
        return [f for f in self.files() if f"/jobs/{job_id}/" in f]


@dataclass
class Hosts:
    stack: Stack
    shared: Shared


@pytest.fixture(scope="module")
def hosts(
    broker: RedisServer,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Hosts]:
    from tests.support.tiny_encoder import build_tiny_bert_classifier

    root = tmp_path_factory.mktemp("hosts")
    with ExitStack() as stack_of:
        s3 = stack_of.enter_context(moto_s3_store())
        shared = Shared(s3.url, s3.options)
        # The operator puts base models in the shared store, not on any one host.
        operator = root / "operator"
        shutil.copytree(tiny_model_dir, operator / "models" / TINY_MODEL)
        build_tiny_bert_classifier(operator / "models" / CLS_MODEL, ["a", "b"])
        seeding = ArtifactStore(operator, shared.url, shared.options)
        for name in (TINY_MODEL, CLS_MODEL):
            seeding.publish(operator / "models" / name)
        url = stack_of.enter_context(postgres_database())
        stack = Stack(
            root / "a",
            url,
            broker.url,
            storage_url=shared.url,
            storage_options=json.dumps(shared.options),
        )
        stack_of.callback(stack.stop)
        stack.start_api()
        yield Hosts(stack, shared)


def _submit(stack: Stack, kind: str, spec: dict[str, Any]) -> str:
    with stack.client() as c:
        r = c.post("/v1/jobs", json={"kind": kind, "spec": spec})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def _finished(stack: Stack, job_id: str, timeout: float = 120) -> dict[str, Any]:
    done = stack.wait_status(job_id, DONE, timeout=timeout)
    assert done["status"] == "succeeded", f"{done}\n{stack.logs()}"
    return done


def _on_host(stack: Stack, data_dir: Path) -> None:
    stack.start_worker(env={"MODELYARD_DATA_DIR": str(data_dir)})


def _finetune(stack: Stack, base: str, task: str, dataset: str, **hp: Any) -> str:
    spec = {"base_model": base, "task": task, "training_dataset": dataset, "hyperparameters": hp}
    return _submit(stack, "finetune", spec)


def _step(stack: Stack, job_id: str) -> int:
    return int((stack.job(job_id).get("progress_detail") or {}).get("step", 0))


def test_one_host_trains_and_leaves_another_serves_and_resumes(
    hosts: Hosts, tmp_path: Path
) -> None:
    """Host B fine-tunes a causal LM and a classifier, then shuts down (SIGTERM) in the
    middle of a third fine-tune: it checkpoints, publishes and hands the job back. Host C,
    with an empty data dir, generates with the first model, predicts with the second and
    finishes the third from B's checkpoint."""
    stack, shared = hosts.stack, hosts.shared
    corpus = upload(stack, write_text_jsonl(tmp_path / "corpus.jsonl"))
    sentiment = upload(stack, write_sentiment_csv(tmp_path / "sentiment.csv"))
    host_b, host_c = tmp_path / "b", tmp_path / "c"
    _on_host(stack, host_b)
    lm_job = _finetune(
        stack, TINY_MODEL, "causal_lm", corpus, max_steps=8, batch_size=8, checkpoint_steps=2
    )
    cls_job = _finetune(
        stack, CLS_MODEL, "sequence_classification", sentiment, max_steps=4, learning_rate=5e-3
    )
    lm, cls = _finished(stack, lm_job), _finished(stack, cls_job)
    for name in (TINY_MODEL, CLS_MODEL):
        assert (host_b / "models" / name / "config.json").is_file()  # fetched by B
    steps = 200  # about 15 ms each: B is still training when its SIGTERM lands
    long_job = _finetune(
        stack,
        TINY_MODEL,
        "causal_lm",
        corpus,
        max_steps=steps,
        batch_size=2,
        checkpoint_steps=steps,
        eval_steps=steps,  # no evaluation (nor the checkpoint of a best one) before the end
    )
    wait_for(lambda: _step(stack, long_job) >= 2, 120, "host B training", 0.05)
    stack.stop_workers()  # SIGTERM: checkpoint at the end of the step, hand the job back
    handed_back = stack.job(long_job)
    assert handed_back["status"] == "queued", f"{handed_back}\n{stack.logs()}"
    with stack.client() as c:
        (checkpoint,) = c.get(f"/v1/jobs/{long_job}/checkpoints").json()["data"]
    saved_at = int(checkpoint["step"])
    assert 2 <= saved_at < steps

    # the jobs' artifacts, published by B: checkpoints every 2 steps and at the evaluation
    # that ended the first epoch (step 7, the best so far when it ran); 2 and 4 were pruned
    # (save_total_limit 3) on B and from the store
    lm_files = shared.of_job(lm_job)
    saved = {part for f in lm_files for part in f.split("/") if part.startswith("checkpoint-")}
    assert sorted(saved) == ["checkpoint-6", "checkpoint-7", "checkpoint-8"]
    assert lm["result"]["best_checkpoint"]["step"] in (7, 8)
    assert [f for f in lm_files if f.endswith("/config.json") and "checkpoint-" not in f]
    assert [f for f in shared.of_job(cls_job) if f.endswith(".safetensors")]
    handed_back_files = shared.of_job(long_job)
    assert any(f"/attempts/1/checkpoints/checkpoint-{saved_at}/" in f for f in handed_back_files)
    assert not host_c.exists()

    _on_host(stack, host_c)
    spec = {"model": lm["result"]["model"], "prompts": ["The blue"], "max_new_tokens": 4}
    generated = stack.submit({**spec, "temperature": 0})
    _finished(stack, generated["id"], timeout=60)
    assert stack.outputs(generated["id"])[0]["completion_tokens"] == 4
    texts = ["the service was great and happy and fast", "the service was rude and slow and late"]
    predicted = _submit(stack, "predict", {"model": cls["result"]["model"], "texts": texts})
    _finished(stack, predicted, timeout=60)
    outputs = stack.outputs(predicted)
    assert [o["prompt_index"] for o in outputs] == [0, 1]
    assert all(o["data"]["label"] in ("pos", "neg") for o in outputs)
    resumed = _finished(stack, long_job)
    assert resumed["attempts"] == 2
    assert resumed["result"]["resumed_from_step"] == saved_at
    assert resumed["result"]["train"]["global_step"] == steps
    stack.stop_workers()

    for job_id in (lm_job, cls_job):
        (fetched,) = host_c.rglob(job_id)  # fetched by C: the models, no checkpoint
        assert list(fetched.rglob("*.safetensors"))
        assert not list(fetched.rglob("checkpoint-*"))
    from_b = [p for p in host_c.rglob(f"checkpoint-{saved_at}") if "/attempts/1/" in p.as_posix()]
    assert from_b and list(from_b[0].rglob("*.safetensors"))  # B's checkpoint, fetched by C
    assert not list(host_c.rglob("*.partial"))
