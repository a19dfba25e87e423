"""OpenAI's frequency and presence penalties in the decode group, on the tiny GPT-2.

They count only the tokens a row generated (not its prompt), each row its own, so a row's
tokens do not depend on the rows decoded beside it or joining and leaving around it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.support.generation import tiny_row
from workers.generation.cache import CachedModel, ModelCache
from workers.generation.decode_group import DecodeGroup, Row
from workers.generation.sampling import penalize_counts

PROMPTS = ["The blue mug", "Fresh bread every", "Our support team answers"]


@pytest.fixture(scope="module")
def entry(tiny_model_dir: Path) -> CachedModel:
    model, _ = ModelCache(2**30).get(str(tiny_model_dir), "cpu")
    return model


def decode(entry: CachedModel, rows: list[Row], joining: list[Row] | None = None) -> None:
    """Decode `rows` to the end; `joining` rows are admitted one per step after the first."""
    group = DecodeGroup(entry.model, "cpu", entry.pad_id, entry.vocab_size)
    later = list(joining or [])
    with torch.inference_mode():
        group.drop(group.admit(rows))
        while len(group) or later:
            if later:
                group.drop(group.admit([later.pop(0)]))
            group.drop(group.step())


def test_penalize_counts_is_openais_formula() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    counts = torch.tensor([[0, 1, 3], [2, 0, 0]], dtype=torch.int16)
    out = penalize_counts(logits, counts, torch.tensor([0.5, 0.0]), torch.tensor([1.0, -1.0]))
    assert torch.allclose(out, torch.tensor([[1.0, 0.5, 0.5], [2.0, 2.0, 3.0]]))


def test_a_strong_presence_penalty_stops_greedy_repeats(entry: CachedModel) -> None:
    plain = tiny_row(entry, "The blue mug")
    penalized = tiny_row(entry, "The blue mug", presence_penalty=2.0)
    decode(entry, [plain])
    decode(entry, [penalized])
    assert max(Counter(plain.text.ids).values()) > 1  # the random model loops without it
    assert len(penalized.text.ids) == 30
    assert max(Counter(penalized.text.ids).values()) == 1


def test_prompt_tokens_are_not_counted(entry: CachedModel) -> None:
    """A penalty on generated tokens only: the first token is the one chosen without it."""
    plain = tiny_row(entry, "The blue mug", max_new_tokens=1)
    penalized = tiny_row(entry, "The blue mug", max_new_tokens=1, presence_penalty=2.0)
    penalized.sampling.frequency_penalty = 2.0
    decode(entry, [plain])
    decode(entry, [penalized])
    assert penalized.text.ids == plain.text.ids


def test_a_negative_frequency_penalty_makes_repeats_likelier(entry: CachedModel) -> None:
    plain = tiny_row(entry, "Fresh bread every")
    eager = tiny_row(entry, "Fresh bread every", frequency_penalty=-2.0)
    decode(entry, [plain])
    decode(entry, [eager])
    assert max(Counter(eager.text.ids).values()) > max(Counter(plain.text.ids).values())


def penalty_rows(entry: CachedModel) -> list[Row]:
    return [
        tiny_row(entry, PROMPTS[0], presence_penalty=1.5),
        tiny_row(entry, PROMPTS[1], frequency_penalty=0.7, seed=5),
        tiny_row(entry, PROMPTS[2]),
        tiny_row(entry, PROMPTS[0], max_new_tokens=7, frequency_penalty=2.0, presence_penalty=-1),
        tiny_row(entry, PROMPTS[2], presence_penalty=0.4, seed=11, repetition_penalty=1.2),
    ]


def test_each_rows_penalties_are_its_own_alone_and_in_a_changing_group(
    entry: CachedModel,
) -> None:
    alone = penalty_rows(entry)
    for r in alone:
        decode(entry, [r])
    together = penalty_rows(entry)
    decode(entry, together[:2], joining=together[2:])  # rows join mid-decode; a short one leaves
    assert [r.text.ids for r in together] == [r.text.ids for r in alone]
