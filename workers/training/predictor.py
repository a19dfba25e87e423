"""A fine-tuned classifier or tagger loaded for inference: what predict and rank share."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from core.enums import FailureType, FineTuneTask
from core.errors import PermanentJobError
from workers.model_refs import ResolvedModel

logger = logging.getLogger(__name__)

TASK_FOR_PEFT_TYPE = {
    "SEQ_CLS": FineTuneTask.SEQUENCE_CLASSIFICATION,
    "TOKEN_CLS": FineTuneTask.TOKEN_CLASSIFICATION,
}
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


def batches(texts: list[str], size: int) -> Iterator[tuple[int, list[str]]]:
    for start in range(0, len(texts), size):
        yield start, texts[start : start + size]
