"""Recommendation scoring: fine-tune all-MiniLM-L6-v2 as a pair classifier on
(user interests, item) -> clicked / skipped, then rank candidate items for users
with the `rank` predict mode, best first, with scores.

    make install && .venv/bin/python examples/recommendations.py

Starts its own embedded stack (Redis, API, worker, beat) on a data dir under
.modelyard/examples/ and talks to it only through the public client. The click data is
generated here: each user clicked the items of their own topic. Runs on a CPU in a few
minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from core.settings import Settings
from modelyard.client import Client
from modelyard.stack import embedded, install_packaged_minilm

BASE_MODEL = "all-MiniLM-L6-v2"
CATALOGUE = {
    "cycling": [
        "carbon road bike with electronic shifting",
        "padded cycling shorts for long rides",
        "bike repair kit with tyre levers and patches",
        "LED front light for night rides",
    ],
    "cooking": [
        "cast iron skillet for searing steaks",
        "italian cookbook of fresh pasta recipes",
        "chef knife forged from german steel",
        "spice rack with twenty jars of herbs",
    ],
    "astronomy": [
        "reflector telescope for deep sky objects",
        "star atlas of the northern hemisphere",
        "red torch that keeps your night vision",
        "moon map poster with named craters",
    ],
    "gardening": [
        "pruning shears for roses and shrubs",
        "organic compost for vegetable beds",
        "packet of heirloom tomato seeds",
        "watering can with a long brass spout",
    ],
}
USERS = {
    "cycling": ["I ride my road bike every weekend", "training for a long-distance bike tour"],
    "cooking": ["I love cooking dinner for friends", "I bake bread and make my own pasta"],
    "astronomy": ["stargazing is my hobby", "I photograph planets and galaxies at night"],
    "gardening": ["I grow vegetables in my garden", "my balcony is full of flowers and herbs"],
}
NEW_USERS = [
    "looking for a gift for someone who cooks a lot",
    "I just joined a cycling club",
    "we watch the night sky from our garden",
]
NEW_ITEMS = ["waterproof cycling jacket", "pizza stone for the oven", "solar eclipse glasses"]


def write_clicks(path: Path) -> Path:
    """Every (user, item) pair once: clicked when the item is from the user's topic."""
    rows = [
        {"text": user, "text_pair": item, "label": "clicked" if topic == own else "skipped"}
        for own, users in USERS.items()
        for user in users
        for topic, items in CATALOGUE.items()
        for item in items
    ]
    random.Random(0).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="fine-tuning steps")
    parser.add_argument("--data-dir", type=Path, default=Path(".modelyard/examples/recommend"))
    args = parser.parse_args()
    started = time.monotonic()
    settings = Settings(data_dir=args.data_dir)
    install_packaged_minilm(settings.models_dir, BASE_MODEL)
    scopes = ["jobs:read", "jobs:write"]
    with (
        embedded(settings, "recommendations-example", scopes) as (base_url, key),
        Client(base_url, api_key=key) as client,
    ):
        dataset = client.upload_dataset(write_clicks(settings.data_dir / "clicks.jsonl"))
        print(
            f"uploaded {dataset['id']}: {dataset['rows']} {dataset['schema']} rows "
            f"({dataset['report']['labels']})"
        )
        job = client.run(
            "finetune",
            {
                "base_model": BASE_MODEL,
                "task": "sequence_classification",
                "training_dataset": dataset["id"],
                "validation_split": 0.1,
                "suffix": "clicks",
                "hyperparameters": {
                    "max_steps": args.steps,
                    "batch_size": 16,
                    "learning_rate": 1e-4,
                    "max_length": 48,
                    "eval_steps": args.steps,
                    "seed": 3,
                },
            },
            timeout=1800,
        )
        model = job["result"]["model"]
        report = job["result"]["eval"]
        print(f"tuned {model}: validation accuracy {report.get('accuracy', float('nan')):.2f}")

        catalogue = [item for items in CATALOGUE.values() for item in items]
        hits = 0
        for topic, users in USERS.items():
            for user in users:
                ranked = client.rank(model, user, catalogue, top_k=len(CATALOGUE[topic]))
                hits += sum(r["text"] in CATALOGUE[topic] for r in ranked)
        total = sum(len(users) * len(CATALOGUE[t]) for t, users in USERS.items())
        print(f"training users: {hits}/{total} of their clicked items ranked on top")

        for user in NEW_USERS:
            ranked = client.rank(model, user, catalogue + NEW_ITEMS, top_k=5)
            print(f"\n{user!r}")
            for place, item in enumerate(ranked, start=1):
                print(f"  {place}. {item['score']:.3f}  {item['text']}")
    print(f"\nfinished in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
