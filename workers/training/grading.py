"""Scores of the graders in core/graders.py: what a reinforcement job's completions earn.

Each metric's library is imported the first time a grader uses it (rouge-score and nltk
take seconds to import). Scores of string_check and text_similarity are in [0, 1]; a multi
grader's is its formula's value.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from core.graders import (
    MultiGrader,
    SimilarityMetric,
    StringCheckGrader,
    TextSimilarityGrader,
    render,
)

AnyGrader = StringCheckGrader | TextSimilarityGrader | MultiGrader
GRADER_REWARD = "grader"
"""The reward function's name: TRL logs its mean score per step as `rewards/grader/mean`."""
GRADER_MEAN_METRIC = f"rewards/{GRADER_REWARD}/mean"


def _unit(value: float) -> float:
    """Into [0, 1]: sacrebleu's 100 comes back as 100.00000000000004."""
    return min(max(value, 0.0), 1.0)


def _fuzzy_match(text: str, reference: str) -> float:
    from rapidfuzz import fuzz, utils

    return _unit(fuzz.WRatio(text, reference, processor=utils.default_process) / 100)


def _bleu(text: str, reference: str) -> float:
    import sacrebleu

    return _unit(sacrebleu.sentence_bleu(text, [reference]).score / 100)


def _gleu(text: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    if not text.split() or not reference.split():
        return 0.0
    return _unit(float(sentence_gleu([reference.split()], text.split())))


@functools.cache
def _rouge_scorer(kind: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind])


def _rouge(kind: str) -> Callable[[str, str], float]:
    def score(text: str, reference: str) -> float:
        return _unit(float(_rouge_scorer(kind).score(reference, text)[kind].fmeasure))

    return score


SIMILARITY: dict[SimilarityMetric, Callable[[str, str], float]] = {
    SimilarityMetric.FUZZY_MATCH: _fuzzy_match,
    SimilarityMetric.BLEU: _bleu,
    SimilarityMetric.GLEU: _gleu,
    SimilarityMetric.ROUGE_1: _rouge("rouge1"),
    SimilarityMetric.ROUGE_2: _rouge("rouge2"),
    SimilarityMetric.ROUGE_3: _rouge("rouge3"),
    SimilarityMetric.ROUGE_4: _rouge("rouge4"),
    SimilarityMetric.ROUGE_5: _rouge("rouge5"),
    SimilarityMetric.ROUGE_L: _rouge("rougeL"),
}
"""Each metric as (graded text, reference) -> score in [0, 1]."""


def _string_check(operation: str, text: str, reference: str) -> float:
    if operation == "eq":
        passed = text == reference
    elif operation == "ne":
        passed = text != reference
    elif operation == "like":
        passed = reference in text
    else:
        passed = reference.lower() in text.lower()
    return 1.0 if passed else 0.0


def score(grader: AnyGrader, output_text: str, item: dict[str, Any]) -> float:
    """What `grader` gives a completion whose text is `output_text`, for the dataset row
    `item`."""
    if isinstance(grader, MultiGrader):
        scores = {key: score(g, output_text, item) for key, g in grader.graders.items()}
        return grader.formula.evaluate(scores)
    text = render(grader.input, output_text, item)
    reference = render(grader.reference, output_text, item)
    if isinstance(grader, StringCheckGrader):
        return _string_check(grader.operation, text, reference)
    return SIMILARITY[grader.evaluation_metric](text, reference)


class GraderReward:
    """A grader as a TRL reward function: TRL passes the completions and, per completion,
    the row's `item` column (the dataset row as JSON)."""

    __name__ = GRADER_REWARD

    def __init__(self, grader: AnyGrader) -> None:
        self.grader = grader

    def __call__(self, completions: list[Any], item: list[str], **kwargs: Any) -> list[float]:
        return [
            score(self.grader, _text(completion), json.loads(row))
            for completion, row in zip(completions, item, strict=True)
        ]


def _text(completion: Any) -> str:
    """A completion's text: a string, or (conversational prompts) its assistant message."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion)
