"""Customer-service bot: LoRA-tune SmolLM2-135M-Instruct on a shop's past Q&A, then answer
new questions with the tuned model, with and without the most similar past answers
retrieved into the prompt (all-MiniLM-L6-v2 embeddings stored with the dataset).

    make install && .venv/bin/python examples/customer_service.py

Starts its own embedded stack (Redis, API, worker, beat) on a data dir under
.modelyard/examples/ and talks to it only through the public client. CPU is enough:
it takes a few minutes, most of them in the 30 LoRA steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from core.settings import Settings
from modelyard.cli import prepare_demo_model
from modelyard.client import Client
from modelyard.stack import embedded, install_packaged_minilm

BASE_MODEL = "SmolLM2-135M-Instruct"
EMBEDDER = "all-MiniLM-L6-v2"
SIGNATURE = "Happy riding, Northwind Cycles."
PAST_QA = [
    ("How long does a bike service take?", "A standard service takes two working days."),
    ("Do you repair electric bikes?", "Yes, our workshop repairs e-bikes of every brand."),
    ("Can I return a helmet?", "Unused helmets can be returned within 30 days."),
    ("Where is my order?", "Orders leave our warehouse within 24 hours; tracking follows."),
    ("Do you ship bikes abroad?", "We ship bikes within the EU; delivery takes a week."),
    ("How do I choose a frame size?", "Measure your inseam and use the size chart on the page."),
    ("Is there a warranty on frames?", "Every frame has a five-year warranty."),
    ("Can I pay in instalments?", "Yes, you can pay in three instalments at checkout."),
    ("My tyre keeps going flat.", "Bring the wheel in and we fit a new inner tube for free."),
    ("Do you rent bikes?", "We rent city bikes from 15 euros a day at the shop."),
]
NEW_QUESTIONS = [
    "How many days does a service of my bike take?",
    "Can I send back a helmet I did not wear?",
    "Do you fix e-bikes?",
]


def write_dataset(path: Path) -> Path:
    """Chat rows: each past question with the answer the shop gave, three times over."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"{answer} {SIGNATURE}"},
            ]
        }
        for _ in range(3)
        for question, answer in PAST_QA
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def answer(
    client: Client, model: str, questions: list[str], retrieval: dict[str, Any] | None
) -> tuple[list[str], list[Any]]:
    spec: dict[str, Any] = {
        "model": model,
        "prompts": questions,
        "chat": True,
        "max_new_tokens": 48,
        "temperature": 0,
    }
    if retrieval is not None:
        spec["retrieval"] = retrieval
    job = client.run("generate", spec, timeout=900)
    texts = [o["text"].strip() for o in client.outputs(job["id"])]
    hits = [
        e["data"]["hits"] for e in client.events(job["id"]) if e["message"].startswith("retrieved")
    ]
    return texts, hits[0] if hits else [[] for _ in questions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="LoRA training steps")
    parser.add_argument("--data-dir", type=Path, default=Path(".modelyard/examples/support"))
    args = parser.parse_args()
    started = time.monotonic()
    settings = Settings(data_dir=args.data_dir)
    print(f"preparing {BASE_MODEL} (the first run converts the packaged GGUF) and {EMBEDDER}")
    prepare_demo_model(settings)
    install_packaged_minilm(settings.models_dir, EMBEDDER)
    scopes = ["jobs:read", "jobs:write"]
    with (
        embedded(settings, "customer-service-example", scopes) as (base_url, key),
        Client(base_url, api_key=key) as client,
    ):
        dataset = client.upload_dataset(write_dataset(settings.data_dir / "support.jsonl"))
        print(f"uploaded {dataset['id']}: {dataset['rows']} past conversations")
        job = client.run(
            "finetune",
            {
                "base_model": BASE_MODEL,
                "task": "causal_lm",
                "training_dataset": dataset["id"],
                "method": "lora",
                "suffix": "support",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "hyperparameters": {
                    "max_steps": args.steps,
                    "batch_size": 4,
                    "learning_rate": 2e-3,
                    "max_length": 96,
                    "eval_steps": args.steps,
                    "seed": 7,
                },
            },
            timeout=1800,
        )
        model = job["result"]["model"]
        losses = [m["value"] for m in client.metrics(job["id"]) if m["name"] == "train_loss"]
        print(f"tuned {model}: train loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        retrieval = {"dataset": dataset["id"], "k": 2, "embedding_model": EMBEDDER}
        plain, _ = answer(client, model, NEW_QUESTIONS, None)
        helped, hits = answer(client, model, NEW_QUESTIONS, retrieval)
        for question, alone, with_context, found in zip(
            NEW_QUESTIONS, plain, helped, hits, strict=True
        ):
            print(f"\nQ: {question}")
            for hit in found:
                print(f"   retrieved ({hit['score']:.2f}): {hit['question']}")
            print(f"   tuned model:             {alone}")
            print(f"   tuned model + retrieval: {with_context}")
    print(f"\nfinished in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
