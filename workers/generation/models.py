"""Finding and loading causal LMs. Safetensors only, no remote code."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from core.enums import FailureType
from core.errors import PermanentJobError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    ref: str
    model: Any
    tokenizer: Any
    device: str


def resolve_model_ref(ref: str, models_dir: Path) -> str:
    """A name under the data dir's models/ wins; anything else is a path or hub id."""
    local = models_dir / ref
    if local.is_dir() and local.resolve().is_relative_to(models_dir.resolve()):
        return str(local)
    return ref


@lru_cache(maxsize=1)
def load_causal_lm(ref: str, device: str) -> LoadedModel:
    logger.info("loading model %s on %s", ref, device)
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
        model: Any = AutoModelForCausalLM.from_pretrained(
            ref, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise PermanentJobError(
            f"cannot load model {ref!r}: {exc}", FailureType.MODEL_NOT_FOUND
        ) from exc
    model.to(device)
    model.eval()
    return LoadedModel(ref=ref, model=model, tokenizer=tokenizer, device=device)
