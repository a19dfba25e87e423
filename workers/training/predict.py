"""Runs a PredictSpec: a fine-tuned classifier or tagger over texts or a dataset's texts.

The task comes from the model: its config's architecture (`...ForSequenceClassification`
or `...ForTokenClassification`), or for a LoRA adapter the adapter's peft task type.
An adapter is merged into its base after loading, so inference runs a plain model.
Entities are grouped as transformers' token-classification pipeline does with
`aggregation_strategy="simple"`, with character offsets into the original text.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from pydantic import ValidationError

from core.enums import DatasetSchema, FailureType, FineTuneTask, PredictMode
from core.errors import PermanentJobError
from core.settings import Settings
from core.specs import PredictSpec
from db.outputs import OutputRecord
from workers.context import RunContext
from workers.runners import RunResult
from workers.training.io import TrainingIO
from workers.training.predictor import Predictor, batches, load_predictor

logger = logging.getLogger(__name__)

FINISH_REASON = "prediction"
OUTSIDE_TAG = "O"
TEXT_SCHEMAS = frozenset(
    {DatasetSchema.TEXT, DatasetSchema.CLASSIFICATION, DatasetSchema.TOKEN_CLASSIFICATION}
)  # a pair dataset's rows are pairs, not texts: rank mode scores pairs


def split_tag(tag: str) -> tuple[bool, str]:
    """(starts an entity, entity type) of a BIO/BIOES tag; an unprefixed tag continues."""
    for prefix in ("B-", "S-", "U-"):
        if tag.startswith(prefix):
            return True, tag[len(prefix) :]
    for prefix in ("I-", "E-", "L-"):
        if tag.startswith(prefix):
            return False, tag[len(prefix) :]
    return False, tag


def group_entities(text: str, tokens: list[tuple[str, float, int, int]]) -> list[dict[str, Any]]:
    """Entities from per-token (tag, score, start, end), grouped like the pipeline's
    "simple" aggregation: a token joins the previous group when it has the same
    type and does not begin a new entity; `O` groups are dropped; a group's score
    is the mean of its tokens' scores."""
    groups: list[tuple[str, int, int, list[float]]] = []
    for tag, score, start, end in tokens:
        begins, kind = split_tag(tag)
        if groups and not begins and groups[-1][0] == kind:
            last_kind, last_start, _, scores = groups[-1]
            groups[-1] = (last_kind, last_start, end, [*scores, score])
        else:
            groups.append((kind, start, end, [score]))
    return [
        {
            "type": kind,
            "start": start,
            "end": end,
            "text": text[start:end],
            "score": sum(scores) / len(scores),
        }
        for kind, start, end, scores in groups
        if kind != OUTSIDE_TAG
    ]


def entities_text(entities: list[dict[str, Any]]) -> str:
    return "; ".join(f"{e['type']}:{e['text']}" for e in entities)


def texts_for(spec: PredictSpec, io: TrainingIO) -> list[str]:
    if spec.texts is not None:
        return list(spec.texts)
    assert spec.dataset is not None  # PredictSpec requires exactly one source
    dataset = io.dataset(spec.dataset)
    if dataset.schema not in TEXT_SCHEMAS:
        raise PermanentJobError(
            f"dataset {dataset.id} has {dataset.schema.value} rows; predict reads "
            "text, classification or token_classification datasets",
            FailureType.INVALID_SPEC,
        )
    texts: list[str] = []
    for index, row in enumerate(dataset.rows):
        text = row.get("text")
        tokens = row.get("tokens")
        if isinstance(text, str):
            texts.append(text)
        elif isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
            texts.append(" ".join(tokens))
        else:
            raise PermanentJobError(
                f"dataset {dataset.id} row {index} has neither a text nor a token list",
                FailureType.INVALID_SPEC,
            )
    if not texts:
        raise PermanentJobError(f"dataset {dataset.id} has no rows", FailureType.INVALID_SPEC)
    return texts


class PredictRunner:
    def __init__(self, settings: Settings, io_factory: Callable[[RunContext], TrainingIO]) -> None:
        self._settings = settings
        self._io_factory = io_factory

    def run(self, raw_spec: dict[str, Any], ctx: RunContext) -> RunResult:
        try:
            spec = PredictSpec.model_validate(raw_spec)
        except ValidationError as exc:
            raise PermanentJobError(str(exc), FailureType.INVALID_SPEC) from exc
        io = self._io_factory(ctx)
        if spec.mode is PredictMode.RANK:
            from workers.training.rank import run_rank

            ctx.check_stop()
            return run_rank(spec, load_predictor(io.resolve_model(spec.model), ctx.device), ctx)
        texts = texts_for(spec, io)
        ctx.check_stop()
        predictor = load_predictor(io.resolve_model(spec.model), ctx.device)
        max_length = min(spec.max_length, predictor.max_length)
        logger.info(
            "job %s: %s over %d texts with %s",
            ctx.job_id,
            predictor.task.value,
            len(texts),
            spec.model,
        )
        outputs: list[OutputRecord] = []
        total = len(texts)
        for start, batch in batches(texts, spec.batch_size):
            ctx.check_stop()
            try:
                outputs.extend(self._batch(predictor, batch, start, max_length))
            except torch.OutOfMemoryError as exc:
                raise PermanentJobError(str(exc), FailureType.OUT_OF_MEMORY) from exc
            done = start + len(batch)
            ctx.report_progress(done / total, done=done, total=total)
        return RunResult(
            outputs=outputs,
            result={
                "task": predictor.task.value,
                "count": len(outputs),
                "label_counts": label_counts(predictor, outputs),
            },
        )

    def _batch(
        self, predictor: Predictor, batch: list[str], start: int, max_length: int
    ) -> list[OutputRecord]:
        tagging = predictor.task is FineTuneTask.TOKEN_CLASSIFICATION
        encoded = predictor.tokenizer(
            batch,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            return_offsets_mapping=tagging,
            return_special_tokens_mask=tagging,
        )
        offsets = encoded.pop("offset_mapping", None)
        special = encoded.pop("special_tokens_mask", None)
        lengths = encoded["attention_mask"].sum(dim=1).tolist()
        with torch.inference_mode():
            logits = predictor.model(**encoded.to(predictor.device)).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        outputs = []
        for i, text in enumerate(batch):
            if tagging:
                text_out, data = self._entities(predictor, text, probs[i], offsets[i], special[i])
            else:
                text_out, data = self._label(predictor, probs[i])
            outputs.append(
                OutputRecord(
                    prompt_index=start + i,
                    sequence_index=0,
                    text=text_out,
                    finish_reason=FINISH_REASON,
                    prompt_tokens=int(lengths[i]),
                    completion_tokens=0,
                    data=data,
                )
            )
        return outputs

    @staticmethod
    def _label(predictor: Predictor, probs: torch.Tensor) -> tuple[str, dict[str, Any]]:
        scores = [float(p) for p in probs.tolist()]
        top = max(range(len(scores)), key=scores.__getitem__)
        label = predictor.labels[top]
        return label, {
            "label": label,
            "score": scores[top],
            "scores": dict(zip(predictor.labels, scores, strict=True)),
        }

    @staticmethod
    def _entities(
        predictor: Predictor,
        text: str,
        probs: torch.Tensor,
        offsets: torch.Tensor,
        special: torch.Tensor,
    ) -> tuple[str, dict[str, Any]]:
        best_scores, best_ids = probs.max(dim=-1)
        tokens = [
            (predictor.labels[int(tag)], float(score), int(begin), int(end))
            for tag, score, (begin, end), is_special in zip(
                best_ids.tolist(),
                best_scores.tolist(),
                offsets.tolist(),
                special.tolist(),
                strict=True,
            )
            if not is_special and end > begin
        ]
        entities = group_entities(text, tokens)
        return entities_text(entities), {"entities": entities}


def label_counts(predictor: Predictor, outputs: list[OutputRecord]) -> dict[str, int]:
    """Predictions per label (classification) or entities per type (tagging), zeros kept."""
    if predictor.task is FineTuneTask.SEQUENCE_CLASSIFICATION:
        counts = Counter(o.data["label"] for o in outputs if o.data)
        return {label: counts[label] for label in predictor.labels}
    types = sorted({split_tag(tag)[1] for tag in predictor.labels} - {OUTSIDE_TAG})
    counts = Counter(e["type"] for o in outputs if o.data for e in o.data["entities"])
    return {kind: counts[kind] for kind in types}
