"""Rank mode of predict jobs: a pair classifier scores (query, candidate) pairs and the
candidates come back sorted by the probability of the positive label (`clicked`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from core.enums import FailureType, FineTuneTask
from core.errors import PermanentJobError
from core.ranking import rank_label
from core.specs import PredictSpec
from db.outputs import OutputRecord
from workers.context import RunContext
from workers.runners import RunResult
from workers.training.predictor import Predictor, batches

logger = logging.getLogger(__name__)

FINISH_REASON = "ranked"


@dataclass(frozen=True)
class Ranked:
    index: int  # the candidate's place in the request
    text: str
    score: float


def score_pairs(
    predictor: Predictor,
    query: str,
    candidates: list[str],
    label_id: int,
    batch_size: int,
    max_length: int,
    ctx: RunContext | None = None,
) -> list[float]:
    """P(label | query, candidate) per candidate, in request order."""
    scores: list[float] = []
    for start, batch in batches(candidates, batch_size):
        if ctx is not None:
            ctx.check_stop()
        encoded = predictor.tokenizer(
            [query] * len(batch),
            batch,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        with torch.inference_mode():
            logits = predictor.model(**encoded.to(predictor.device)).logits
        probs = torch.softmax(logits.float(), dim=-1)[:, label_id].cpu()
        scores.extend(float(p) for p in probs.tolist())
        if ctx is not None:
            done = start + len(batch)
            ctx.report_progress(done / len(candidates), done=done, total=len(candidates))
    return scores


def rank(scores: list[float], candidates: list[str], top_k: int | None) -> list[Ranked]:
    """Best first; equal scores keep the request order."""
    order = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))
    return [Ranked(i, candidates[i], scores[i]) for i in order[:top_k]]


def run_rank(spec: PredictSpec, predictor: Predictor, ctx: RunContext) -> RunResult:
    assert spec.query is not None and spec.candidates is not None  # PredictSpec checks rank mode
    if predictor.task is not FineTuneTask.SEQUENCE_CLASSIFICATION:
        raise PermanentJobError(
            f"model {spec.model!r} is a {predictor.task.value} model; rank needs a sequence "
            "(pair) classifier",
            FailureType.INVALID_SPEC,
        )
    try:
        label = rank_label(predictor.labels, spec.label)
    except ValueError as exc:
        raise PermanentJobError(str(exc), FailureType.INVALID_SPEC) from exc
    max_length = min(spec.max_length, predictor.max_length)
    logger.info(
        "job %s: ranking %d candidates by P(%s) with %s",
        ctx.job_id,
        len(spec.candidates),
        label,
        spec.model,
    )
    try:
        scores = score_pairs(
            predictor,
            spec.query,
            list(spec.candidates),
            predictor.labels.index(label),
            spec.batch_size,
            max_length,
            ctx,
        )
    except torch.OutOfMemoryError as exc:
        raise PermanentJobError(str(exc), FailureType.OUT_OF_MEMORY) from exc
    ranked = rank(scores, list(spec.candidates), spec.top_k)
    outputs = [
        OutputRecord(
            prompt_index=position,
            sequence_index=0,
            text=item.text,
            finish_reason=FINISH_REASON,
            prompt_tokens=0,
            completion_tokens=0,
            data={"rank": position + 1, "index": item.index, "score": item.score},
        )
        for position, item in enumerate(ranked)
    ]
    result: dict[str, Any] = {
        "task": "rank",
        "label": label,
        "count": len(ranked),
        "candidates": len(spec.candidates),
        "ranked": [{"index": r.index, "text": r.text, "score": r.score} for r in ranked],
    }
    return RunResult(outputs=outputs, result=result)
