"""Runs a PredictSpec: a fine-tuned classifier or tagger over texts or a dataset's texts.

The task comes from the model: its config's architecture (`...ForSequenceClassification`
or `...ForTokenClassification`), or for a LoRA adapter the adapter's peft task type.
An adapter is merged into its base after loading, so inference runs a plain model.
Entities are grouped as transformers' token-classification pipeline does with
`aggregation_strategy="simple"`, with character offsets into the original text.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from core.enums import DatasetSchema, FailureType, FineTuneTask, PredictMode
from core.errors import PermanentJobError
from core.settings import Settings
from core.specs import PredictSpec
from db.outputs import GeneratedText
from workers.context import RunContext
from workers.runners import RunResult
from workers.training.io import ResolvedModel, TrainingIO

logger = logging.getLogger(__name__)

FINISH_REASON = "prediction"
OUTSIDE_TAG = "O"
TASK_FOR_PEFT_TYPE = {
    "SEQ_CLS": FineTuneTask.SEQUENCE_CLASSIFICATION,
    "TOKEN_CLS": FineTuneTask.TOKEN_CLASSIFICATION,
}
TEXT_SCHEMAS = frozenset(
    {DatasetSchema.TEXT, DatasetSchema.CLASSIFICATION, DatasetSchema.TOKEN_CLASSIFICATION}
)  # a pair dataset's rows are pairs, not texts: rank mode scores pairs
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
UNBOUNDED_LENGTH = 1_000_000  # tokenizers without a limit report a huge model_max_length


@dataclass(frozen=True)
class Predictor:
    task: FineTuneTask
    model: Any
    tokenizer: Any
    labels: list[str]
    max_length: int  # what the model's positions allow
    device: str


def _task_from_architectures(ref: str, config: Any) -> FineTuneTask:
    architectures: list[str] = list(getattr(config, "architectures", None) or [])
    for name in architectures:
        if name.endswith("ForSequenceClassification"):
            return FineTuneTask.SEQUENCE_CLASSIFICATION
        if name.endswith("ForTokenClassification"):
            return FineTuneTask.TOKEN_CLASSIFICATION
    found = ", ".join(architectures) or "none recorded"
    raise PermanentJobError(
        f"model {ref!r} is not a classifier or tagger (architectures: {found}); predict "
        "runs ...ForSequenceClassification and ...ForTokenClassification models",
        FailureType.INVALID_SPEC,
    )


def _labels_from_config(config: Any) -> list[str]:
    id2label: dict[int, str] = dict(getattr(config, "id2label", None) or {})
    return [str(id2label[i]) for i in sorted(id2label)]


def _detect(resolved: ResolvedModel) -> tuple[FineTuneTask, Any]:
    """The task, and the config of the model whose head the predictions come from."""
    if resolved.adapter_of is None:
        config = AutoConfig.from_pretrained(resolved.ref, trust_remote_code=False)
        return _task_from_architectures(resolved.ref, config), config
    from peft import PeftConfig

    peft_config = PeftConfig.from_pretrained(resolved.ref)
    task_type = getattr(peft_config.task_type, "value", peft_config.task_type)
    adapter_config = None
    if (Path(resolved.ref) / "config.json").is_file():
        adapter_config = AutoConfig.from_pretrained(resolved.ref, trust_remote_code=False)
    if task_type in TASK_FOR_PEFT_TYPE:
        return TASK_FOR_PEFT_TYPE[task_type], adapter_config
    if adapter_config is not None:
        return _task_from_architectures(resolved.ref, adapter_config), adapter_config
    base_config = AutoConfig.from_pretrained(resolved.adapter_of, trust_remote_code=False)
    return _task_from_architectures(resolved.adapter_of, base_config), None


def _tokenizer(resolved: ResolvedModel) -> Any:
    source = resolved.ref
    if resolved.adapter_of is not None and not any(
        (Path(resolved.ref) / name).is_file() for name in TOKENIZER_FILES
    ):
        source = resolved.adapter_of
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


def _model_auto_class(task: FineTuneTask) -> Any:
    if task is FineTuneTask.SEQUENCE_CLASSIFICATION:
        return AutoModelForSequenceClassification
    return AutoModelForTokenClassification


def _load_model(resolved: ResolvedModel, task: FineTuneTask, labels: list[str]) -> Any:
    auto_class = _model_auto_class(task)
    if resolved.adapter_of is None:
        return auto_class.from_pretrained(
            resolved.ref, use_safetensors=True, trust_remote_code=False
        )
    from peft import PeftModel

    base = auto_class.from_pretrained(
        resolved.adapter_of,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,  # the head comes from the adapter's saved modules
        use_safetensors=True,
        trust_remote_code=False,
    )
    with warnings.catch_warnings():
        # peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        adapted = PeftModel.from_pretrained(base, resolved.ref)
    return adapted.merge_and_unload()


def _resolve_labels(resolved: ResolvedModel, config: Any) -> list[str]:
    from_config = _labels_from_config(config) if config is not None else []
    if resolved.labels:
        if from_config and len(from_config) != len(resolved.labels):
            raise PermanentJobError(
                f"model {resolved.ref!r} has {len(from_config)} outputs but "
                f"{len(resolved.labels)} registered labels",
                FailureType.INVALID_SPEC,
            )
        return list(resolved.labels)
    if not from_config:
        raise PermanentJobError(
            f"model {resolved.ref!r} names no labels (no id2label, none registered)",
            FailureType.INVALID_SPEC,
        )
    return from_config


def _max_length(model: Any, tokenizer: Any) -> int:
    limits = [UNBOUNDED_LENGTH]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and tokenizer_limit > 0:
        limits.append(tokenizer_limit)
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits)


def _ensure_padding(tokenizer: Any, model: Any, ref: str) -> None:
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token_id is None:
        raise PermanentJobError(
            f"tokenizer of {ref!r} has neither a padding nor an end-of-sequence token",
            FailureType.INVALID_SPEC,
        )
    tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.eos_token_id


def load_predictor(resolved: ResolvedModel, device: str) -> Predictor:
    """Load a classifier or tagger (or a LoRA adapter merged into its base) for inference;
    the last one loaded stays cached in the worker process."""
    return _load_predictor(resolved.ref, tuple(resolved.labels), resolved.adapter_of, device)


@lru_cache(maxsize=1)
def _load_predictor(
    ref: str, labels: tuple[str, ...], adapter_of: str | None, device: str
) -> Predictor:
    resolved = ResolvedModel(ref=ref, labels=list(labels), adapter_of=adapter_of)
    logger.info("loading predictor %s on %s", resolved.ref, device)
    try:
        task, config = _detect(resolved)
        names = _resolve_labels(resolved, config)
        tokenizer = _tokenizer(resolved)
        model = _load_model(resolved, task, names)
    except PermanentJobError:
        raise
    except torch.OutOfMemoryError as exc:
        raise PermanentJobError(str(exc), FailureType.OUT_OF_MEMORY) from exc
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise PermanentJobError(
            f"cannot load model {resolved.ref!r}: {exc}", FailureType.MODEL_NOT_FOUND
        ) from exc
    if model.config.num_labels != len(names):
        raise PermanentJobError(
            f"model {resolved.ref!r} has {model.config.num_labels} outputs but {len(names)} labels",
            FailureType.INVALID_SPEC,
        )
    if task is FineTuneTask.TOKEN_CLASSIFICATION and not getattr(tokenizer, "is_fast", False):
        raise PermanentJobError(
            f"model {resolved.ref!r} has no fast tokenizer; entity offsets need one",
            FailureType.INVALID_SPEC,
        )
    _ensure_padding(tokenizer, model, resolved.ref)
    model.to(device)
    model.eval()
    return Predictor(task, model, tokenizer, names, _max_length(model, tokenizer), device)


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


def batches(texts: list[str], size: int) -> Iterator[tuple[int, list[str]]]:
    for start in range(0, len(texts), size):
        yield start, texts[start : start + size]


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
            from workers.training.rank import run_rank  # rank builds on this module

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
        outputs: list[GeneratedText] = []
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
    ) -> list[GeneratedText]:
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
                GeneratedText(
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


def label_counts(predictor: Predictor, outputs: list[GeneratedText]) -> dict[str, int]:
    """Predictions per label (classification) or entities per type (tagging), zeros kept."""
    if predictor.task is FineTuneTask.SEQUENCE_CLASSIFICATION:
        counts = Counter(o.data["label"] for o in outputs if o.data)
        return {label: counts[label] for label in predictor.labels}
    types = sorted({split_tag(tag)[1] for tag in predictor.labels} - {OUTSIDE_TAG})
    counts = Counter(e["type"] for o in outputs if o.data for e in o.data["entities"])
    return {kind: counts[kind] for kind in types}
