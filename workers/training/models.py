"""Where a fine-tune's starting weights come from, and loading them (safetensors only)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from core.enums import FailureType, FineTuneTask
from core.errors import PermanentJobError
from workers.model_refs import ResolvedModel
from workers.training.io import CheckpointInfo

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")

MODEL_CLASS: dict[FineTuneTask, Any] = {
    FineTuneTask.CAUSAL_LM: AutoModelForCausalLM,
    FineTuneTask.SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
    FineTuneTask.TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
}


@dataclass(frozen=True)
class WeightsSource:
    """A full model to load, maybe a PEFT adapter on it, and where the tokenizer lives."""

    base: str
    adapter: str | None
    tokenizer: str
    origin: str  # for events: what the weights are


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def _label(ref: str) -> str:
    """How events name a model: hub ids as given, local directories from their `models/` or
    `jobs/` part on (never the server's absolute path)."""
    path = Path(ref)
    if not path.is_absolute():
        return ref
    for anchor in ("jobs", "models"):
        if anchor in path.parts:
            start = len(path.parts) - 1 - path.parts[::-1].index(anchor)
            return "/".join(path.parts[start:])
    return path.name


def weights_source(resolved: ResolvedModel, checkpoint: CheckpointInfo | None) -> WeightsSource:
    """The resolved base model (a LoRA adapter when `adapter_of` is set), or, when
    `checkpoint` is given, that checkpoint's weights: a full model or an adapter on the base."""
    base = resolved.adapter_of or resolved.ref
    adapter = resolved.ref if resolved.adapter_of else None
    origin = f"adapter {_label(resolved.ref)} on {_label(base)}" if adapter else _label(base)
    if checkpoint is not None:
        path = str(checkpoint.path)
        if is_adapter_dir(path):
            adapter, origin = path, f"adapter checkpoint {_label(path)} on {_label(base)}"
        else:
            base, adapter, origin = path, None, f"checkpoint {_label(path)}"
    tokenizer_from = adapter if adapter is not None and _has_tokenizer(adapter) else base
    return WeightsSource(base=base, adapter=adapter, tokenizer=tokenizer_from, origin=origin)


def require_safetensors(ref: str) -> None:
    """A local model directory must hold safetensors weights; hub ids are checked on load."""
    path = Path(ref)
    if not path.is_dir():
        return
    if is_adapter_dir(path):
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise PermanentJobError(
                f"adapter directory {ref} has no {ADAPTER_WEIGHTS} (only safetensors are loaded)",
                FailureType.MODEL_NOT_FOUND,
            )
        return
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
        extra = f"; it has {', '.join(found)}, which are not loaded" if found else ""
        raise PermanentJobError(
            f"model directory {ref} has no safetensors weights{extra}",
            FailureType.MODEL_NOT_FOUND,
        )


def load_tokenizer(ref: str) -> Any:
    try:
        return AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise PermanentJobError(
            f"cannot load the tokenizer of {ref!r}: {exc}", FailureType.MODEL_NOT_FOUND
        ) from exc


def load_base_model(task: FineTuneTask, ref: str, labels: list[str]) -> Any:
    """The full model in float32 (mixed precision keeps fp32 master weights); classification
    heads are sized for `labels`, and replaced when the stored head has another size."""
    require_safetensors(ref)
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        "trust_remote_code": False,
        "dtype": torch.float32,
    }
    if task is not FineTuneTask.CAUSAL_LM:
        kwargs.update(
            id2label=dict(enumerate(labels)),  # sets num_labels too
            label2id={name: i for i, name in enumerate(labels)},
            ignore_mismatched_sizes=True,
        )
    logger.info("loading %s model from %s", task.value, ref)
    try:
        return MODEL_CLASS[task].from_pretrained(ref, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise PermanentJobError(
            f"cannot load model {ref!r} for {task.value}: {exc}", FailureType.MODEL_NOT_FOUND
        ) from exc
