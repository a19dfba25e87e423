"""The applications end to end in real workers: a customer-service bot tuned on chat Q&A
(answers from the tuned model; retrieval of past answers), and recommendation scoring
(a pair classifier ranks candidates). Training runs once per module on PostgreSQL only:
SQLite adds nothing to these paths that the other e2e modules don't cover.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_CHAT_MODEL, install_tiny_chat_model
from tests.support.harness import Stack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

CHAT_MODEL = TINY_CHAT_MODEL
ENCODER = "tiny-encoder"
QA = [
    ("Where is my order?", "Your parcel is on its way."),
    ("Can I return a mug?", "Yes, within thirty days."),
    ("Do you ship abroad?", "We ship to forty countries."),
]
INTERESTS = {
    "I love hiking in the mountains and camping": [
        "trail running shoes",
        "a lightweight tent",
        "a hiking backpack",
    ],
    "I love cooking italian food at home": [
        "a cookbook of pasta recipes",
        "a sharp chef knife",
        "a cast iron pan",
    ],
}
DONE = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def apps(stack: Stack, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """The stack with a chat-templated tiny GPT-2 and a tiny BERT encoder in its models dir."""
    from tests.support.tiny_encoder import build_tiny_bert_base

    models = stack.workdir / "data" / "models"
    install_tiny_chat_model(tiny_model_dir, stack.workdir / "data")
    build_tiny_bert_base(models / ENCODER)
    return stack


def upload(stack: Stack, path: Path) -> dict[str, Any]:
    with stack.client() as c, path.open("rb") as fh:
        resp = c.post("/v1/datasets", files={"file": (path.name, fh)})
    assert resp.status_code == 201, resp.text
    dataset: dict[str, Any] = resp.json()
    return dataset


def run(stack: Stack, kind: str, spec: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    with stack.client() as c:
        resp = c.post("/v1/jobs", json={"kind": kind, "spec": spec})
    assert resp.status_code == 202, resp.text
    done = stack.wait_status(resp.json()["id"], DONE, timeout=timeout)
    assert done["status"] == "succeeded", f"{done}\n{stack.logs()}"
    return done


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bot(apps: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny GPT-2 fully tuned on the chat Q&A; its registered name and the dataset id."""
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA * 4
    ]
    dataset = upload(apps, write_jsonl(tmp_path_factory.mktemp("qa") / "qa.jsonl", rows))
    assert dataset["schema"] == "chat"
    done = run(
        apps,
        "finetune",
        {
            "base_model": CHAT_MODEL,
            "task": "causal_lm",
            "training_dataset": dataset["id"],
            "validation_split": 0.0,
            "suffix": "support",
            "hyperparameters": {
                "max_steps": 150,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "eval_steps": 150,
                "seed": 1,
            },
        },
        timeout=300,
    )
    return {"model": done["result"]["model"], "dataset": dataset["id"]}


def ask(stack: Stack, model: str, questions: list[str], **extra: Any) -> dict[str, Any]:
    spec = {
        "model": model,
        "messages": [[{"role": "user", "content": q}] for q in questions],
        "temperature": 0,
        "max_new_tokens": 32,
        "stop": ["\n"],
        **extra,
    }
    return run(stack, "generate", spec)


def test_bot_answers_from_the_tuned_model(apps: Stack, bot: dict[str, str]) -> None:
    job = ask(apps, bot["model"], [q for q, _ in QA])
    answers = [o["text"].strip() for o in apps.outputs(job["id"])]
    assert answers == [a for _, a in QA]
    untuned = ask(apps, CHAT_MODEL, [QA[0][0]])
    assert apps.outputs(untuned["id"])[0]["text"].strip() != QA[0][1]


def test_bot_retrieves_the_most_similar_past_answers(apps: Stack, bot: dict[str, str]) -> None:
    question = QA[1][0]
    retrieval = {"dataset": bot["dataset"], "k": 2, "embedding_model": ENCODER}
    plain = ask(apps, bot["model"], [question])
    job = ask(apps, bot["model"], [question], retrieval=retrieval)
    (event,) = [e for e in apps.events(job["id"]) if e["message"].startswith("retrieved")]
    (hits,) = event["data"]["hits"]
    assert len(hits) == 2
    assert hits[0]["question"] == question  # the same text: cosine 1
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    with_context = apps.outputs(job["id"])[0]
    assert with_context["prompt_tokens"] > apps.outputs(plain["id"])[0]["prompt_tokens"] + 10
    stored = list((apps.workdir / "data").rglob("embeddings-*.safetensors"))
    assert len(stored) == 1
    written = stored[0].stat().st_mtime_ns
    ask(apps, bot["model"], [QA[2][0]], retrieval=retrieval)
    assert stored[0].stat().st_mtime_ns == written  # the second job read the stored file


@pytest.fixture(scope="module")
def recommender(apps: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny BERT fine-tuned as a pair classifier: (interests, item) -> clicked/skipped."""
    rows = [
        {"text": user, "text_pair": item, "label": "clicked" if owner == user else "skipped"}
        for user in INTERESTS
        for owner, items in INTERESTS.items()
        for item in items
    ]
    dataset = upload(apps, write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows * 3))
    assert dataset["schema"] == "pair_classification"
    assert dataset["labels"] == ["clicked", "skipped"]
    done = run(
        apps,
        "finetune",
        {
            "base_model": ENCODER,
            "task": "sequence_classification",
            "training_dataset": dataset["id"],
            "validation_split": 0.0,
            "hyperparameters": {
                "max_steps": 120,
                "batch_size": 8,
                "learning_rate": 5e-3,
                "eval_steps": 120,
                "seed": 2,
            },
        },
        timeout=300,
    )
    model: str = done["result"]["model"]
    return model


def test_rank_puts_the_clicked_items_first(apps: Stack, recommender: str) -> None:
    candidates = [item for items in INTERESTS.values() for item in items]
    for user, clicked in INTERESTS.items():
        spec = {"model": recommender, "mode": "rank", "query": user, "candidates": candidates}
        done = run(apps, "predict", spec)
        ranked = done["result"]["ranked"]
        assert done["result"]["label"] == "clicked"
        scores = [r["score"] for r in ranked]
        assert scores == sorted(scores, reverse=True)
        assert sorted(r["index"] for r in ranked) == list(range(len(candidates)))
        assert {r["text"] for r in ranked[: len(clicked)]} == set(clicked), ranked
        outputs = apps.outputs(done["id"])
        assert [o["text"] for o in outputs] == [r["text"] for r in ranked]
        assert [o["data"]["rank"] for o in outputs] == list(range(1, len(candidates) + 1))


def test_rank_top_k_keeps_the_best(apps: Stack, recommender: str) -> None:
    user, clicked = next(iter(INTERESTS.items()))
    candidates = list(reversed([item for items in INTERESTS.values() for item in items]))
    spec = {
        "model": recommender,
        "mode": "rank",
        "query": user,
        "candidates": candidates,
        "top_k": 2,
    }
    ranked = run(apps, "predict", spec)["result"]["ranked"]
    assert len(ranked) == 2
    assert {r["text"] for r in ranked} <= set(clicked)
    assert all(candidates[r["index"]] == r["text"] for r in ranked)
