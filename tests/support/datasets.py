"""Small labelled datasets written by the tests themselves."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.support.tiny_model import CORPUS

POSITIVE = ["great", "excellent", "happy", "wonderful", "love", "superb", "fast", "friendly"]
NEGATIVE = ["terrible", "awful", "sad", "broken", "hate", "slow", "rude", "late"]
NAMES = ["Alice", "Bob", "Carla", "Dmitri", "Erin", "Farid"]
PLACES = ["Paris", "Lagos", "Lima", "Oslo", "Pune", "Quito"]


def write_text_jsonl(path: Path, rows: int = 60) -> Path:
    lines = [json.dumps({"text": CORPUS[i % len(CORPUS)]}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_prompt_completion_jsonl(path: Path, rows: int = 60, completion: str = " soon.") -> Path:
    """The corpus' sentences as prompts, each with the same completion (2 tokens of the tiny
    model's tokenizer, which has no eos: a greedy completion of 2 tokens can equal it)."""
    lines = [
        json.dumps({"prompt": CORPUS[i % len(CORPUS)], "completion": completion})
        for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_sentiment_csv(path: Path, rows: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(rows):
        positive = i % 2 == 0
        words = rng.sample(POSITIVE if positive else NEGATIVE, 3)
        lines.append(f"the service was {' and '.join(words)},{'pos' if positive else 'neg'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_ner_conll(path: Path, sentences: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    blocks = []
    for _ in range(sentences):
        name, place = rng.choice(NAMES), rng.choice(PLACES)
        tokens = [(name, "B-PER"), ("visited", "O"), (place, "B-LOC"), ("today", "O")]
        if rng.random() < 0.5:
            tokens = [("Yesterday", "O"), *tokens[:-1]]
        blocks.append("\n".join(f"{tok}\t{tag}" for tok, tag in tokens))
    path.write_text("\n\n".join(blocks) + "\n")
    return path
