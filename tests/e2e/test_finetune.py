"""Fine-tuning end to end: upload, train in a real worker, register, serve; kill and cancel.

Runs on SQLite and PostgreSQL (see the `database_url` fixture).
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_MODEL
from tests.faults.scenarios import kill_worker_mid_finetune
from tests.support.datasets import write_ner_conll, write_sentiment_csv, write_text_jsonl
from tests.support.harness import Stack, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLS_MODEL = "tiny-bert-cls"
NER_MODEL = "tiny-bert-ner"
DONE = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.support.tiny_encoder import build_tiny_bert_classifier, build_tiny_bert_tagger

    root = tmp_path_factory.mktemp("encoders")
    return {
        CLS_MODEL: build_tiny_bert_classifier(root / CLS_MODEL, ["a", "b"]),
        NER_MODEL: build_tiny_bert_tagger(root / NER_MODEL, ["O", "B-X"]),
    }


@pytest.fixture(scope="module")
def ft(stack: Stack, encoders: dict[str, Path]) -> Stack:
    for name, path in encoders.items():
        shutil.copytree(path, stack.workdir / "data" / "models" / name, dirs_exist_ok=True)
    return stack


@pytest.fixture
def live(ft: Stack) -> Stack:
    """At least one live worker."""
    for proc in list(ft.workers):
        if not proc.alive():
            ft.workers.remove(proc)
    if not ft.workers:
        ft.start_worker()
    return ft


def upload(stack: Stack, path: Path) -> str:
    with stack.client() as c, path.open("rb") as fh:
        resp = c.post("/v1/datasets", files={"file": (path.name, fh)})
    assert resp.status_code == 201, resp.text
    dataset_id: str = resp.json()["id"]
    return dataset_id


def submit(stack: Stack, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    with stack.client() as c:
        resp = c.post("/v1/jobs", json={"kind": kind, "spec": spec})
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    return job


def metric_values(stack: Stack, job_id: str, name: str) -> list[float]:
    with stack.client() as c:
        data = c.get(f"/v1/jobs/{job_id}/metrics", params={"name": name, "limit": 5000}).json()
    return [m["value"] for m in data["data"]]


def checkpoints(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    with stack.client() as c:
        data: list[dict[str, Any]] = c.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    return data


def train(stack: Stack, spec: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
    job = submit(stack, "finetune", spec)
    done = stack.wait_status(job["id"], DONE, timeout=timeout)
    assert done["status"] == "succeeded", f"{done}\n{stack.logs()}"
    assert done["attempts"] == 1
    losses = metric_values(stack, job["id"], "train_loss")
    assert len(losses) >= 4
    head, tail = losses[: len(losses) // 4], losses[-(len(losses) // 4) :]
    assert sum(tail) / len(tail) < sum(head) / len(head), losses
    name = done["result"]["model"]
    assert name.startswith("ft:")
    with stack.client() as c:
        model = c.get(f"/v1/models/{name}").json()
    assert model["job_id"] == job["id"]
    assert model["method"] == spec.get("method", "full")
    assert model["adapter"] is (spec.get("method", "full") != "full")
    return done


def serve(stack: Stack, kind: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    job = submit(stack, kind, spec)
    done = stack.wait_status(job["id"], DONE, timeout=120)
    assert done["status"] == "succeeded", f"{done}\n{stack.logs()}"
    return stack.outputs(job["id"])


HP: dict[str, Any] = {"max_steps": 40, "batch_size": 8, "eval_steps": 20, "seed": 3}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_causal_lm(live: Stack, tmp_path: Path, method: str) -> None:
    ds = upload(live, write_text_jsonl(tmp_path / "corpus.jsonl"))
    spec = {
        "base_model": TINY_MODEL,
        "task": "causal_lm",
        "training_dataset": ds,
        "method": method,
        "suffix": f"shop-{method}",
        "hyperparameters": {**HP, "learning_rate": 5e-3 if method == "full" else 2e-2},
        "tracking": ["tensorboard"] if method == "full" else None,
    }
    done = train(live, spec)
    assert done["result"]["model"].startswith(f"ft:{TINY_MODEL}:shop-{method}:")
    assert done["result"]["eval"]["perplexity"] > 0
    with live.client() as c:  # TensorBoard files where tracking was on, a 404 where off
        answer = c.get(f"/v1/jobs/{done['id']}/tensorboard")
    if method == "full":
        assert answer.status_code == 200, answer.text
        with tarfile.open(fileobj=io.BytesIO(answer.content), mode="r:gz") as tar:
            names = tar.getnames()
        assert names and all(n.startswith("attempt-1/events.out.tfevents.") for n in names)
    else:
        assert answer.status_code == 404, answer.text
    outs = serve(
        live,
        "generate",
        {
            "model": done["result"]["model"],
            "prompts": ["The blue"],
            "max_new_tokens": 6,
            "temperature": 0,
        },
    )
    assert len(outs) == 1
    assert outs[0]["completion_tokens"] == 6


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sequence_classification(live: Stack, tmp_path: Path, method: str) -> None:
    ds = upload(live, write_sentiment_csv(tmp_path / "sentiment.csv"))
    spec = {
        "base_model": CLS_MODEL,
        "task": "sequence_classification",
        "training_dataset": ds,
        "method": method,
        "hyperparameters": {**HP, "learning_rate": 5e-3 if method == "full" else 2e-2},
    }
    done = train(live, spec)
    report = done["result"]["eval"]
    assert 0.0 <= report["accuracy"] <= 1.0
    assert "confusion_matrix" in report
    best = done["result"]["best_checkpoint"]  # the registered model's weights
    assert best["metric"] == "eval_f1_macro" and best["step"] in (20, 40)
    assert best["score"] == report["macro avg"]["f1-score"]
    texts = ["the service was great and happy and fast", "the service was rude and slow and late"]
    outs = serve(live, "predict", {"model": done["result"]["model"], "texts": texts})
    assert [o["prompt_index"] for o in outs] == [0, 1]
    assert all(o["data"]["label"] in ("pos", "neg") for o in outs)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_token_classification(live: Stack, tmp_path: Path, method: str) -> None:
    ds = upload(live, write_ner_conll(tmp_path / "ner.conll"))
    spec = {
        "base_model": NER_MODEL,
        "task": "token_classification",
        "training_dataset": ds,
        "method": method,
        "hyperparameters": {**HP, "learning_rate": 5e-3 if method == "full" else 2e-2},
    }
    done = train(live, spec)
    report = done["result"]["eval"]
    assert {"PER", "LOC"} <= set(report)
    outs = serve(
        live, "predict", {"model": done["result"]["model"], "texts": ["Alice visited Paris today"]}
    )
    assert len(outs) == 1
    assert isinstance(outs[0]["data"]["entities"], list)


def long_training(live: Stack, tmp_path: Path, steps: int, every: int) -> dict[str, Any]:
    ds = upload(live, write_text_jsonl(tmp_path / "long.jsonl", rows=200))
    spec = {
        "base_model": TINY_MODEL,
        "task": "causal_lm",
        "training_dataset": ds,
        "hyperparameters": {
            "max_steps": steps,
            "batch_size": 4,
            "checkpoint_steps": every,
            "eval_steps": every,
            "learning_rate": 1e-3,
        },
    }
    return submit(live, "finetune", spec)


@pytest.mark.faults
def test_killed_worker_resumes_from_last_checkpoint(
    live: Stack, database_url: str, tmp_path: Path
) -> None:
    """Scenario 1 of the fault suite (issue 5), on SQLite and PostgreSQL."""
    for proc in live.workers[1:]:
        proc.stop()
    del live.workers[1:]
    ds = upload(live, write_text_jsonl(tmp_path / "long.jsonl", rows=200))
    outcome = kill_worker_mid_finetune(live, database_url, ds, steps=300, every=25)
    done = outcome.details["job"]
    assert done["status"] == "succeeded", f"{done}\n{live.logs()}"
    assert done["attempts"] == 2
    resumed = done["result"]["resumed_from_step"]
    assert resumed is not None and resumed >= outcome.details["saved"] >= 25
    assert done["result"]["train"]["global_step"] == 300
    figures = outcome.figures
    assert figures.steps_redone is not None and figures.steps_redone <= 25
    assert (figures.lost, figures.concurrent, figures.duplicate_effects) == (0, 0, 0), (
        outcome.audit.duplicates
    )


def test_cancel_mid_training_keeps_a_checkpoint(live: Stack, tmp_path: Path) -> None:
    job = long_training(live, tmp_path, steps=5000, every=4000)
    wait_for(
        lambda: (live.job(job["id"]).get("progress_detail") or {}).get("step", 0) >= 3,
        180,
        "training under way",
        0.2,
    )
    with live.client() as c:
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    done = live.wait_status(job["id"], DONE, timeout=60)
    assert done["status"] == "cancelled"
    kept = checkpoints(live, job["id"])
    assert len(kept) == 1
    assert 3 <= kept[0]["step"] < 5000
