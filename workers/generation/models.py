"""Finding and loading causal LMs. Safetensors only, no remote code."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
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


@lru_cache(maxsize=1)
def load_causal_lm(ref: str, device: str, adapter_of: str | None = None) -> LoadedModel:
    """Load a causal LM; with `adapter_of`, `ref` is a LoRA adapter applied on that base."""
    logger.info("loading model %s on %s", ref, device)
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
        model: Any = AutoModelForCausalLM.from_pretrained(
            adapter_of or ref, use_safetensors=True, trust_remote_code=False
        )
        if adapter_of is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, ref)
    except (OSError, ValueError) as exc:
        raise PermanentJobError(
            f"cannot load model {ref!r}: {exc}", FailureType.MODEL_NOT_FOUND
        ) from exc
    model.to(device)
    model.eval()
    return LoadedModel(ref=ref, model=model, tokenizer=tokenizer, device=device)
