"""LoRA and AdaLoRA (peft): configs with sane per-model defaults, new or continued adapters."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft import AdaLoraConfig, LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from core.enums import FailureType, FineTuneMethod, FineTuneTask
from core.errors import PermanentJobError
from core.specs import LoraSpec

logger = logging.getLogger(__name__)

PEFT_TASK_TYPE = {
    FineTuneTask.CAUSAL_LM: TaskType.CAUSAL_LM,
    FineTuneTask.SEQUENCE_CLASSIFICATION: TaskType.SEQ_CLS,
    FineTuneTask.TOKEN_CLASSIFICATION: TaskType.TOKEN_CLS,
}
# Tried in order for model types peft has no default for: attention projections by family.
FALLBACK_TARGETS = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("c_attn",),
    ("q_lin", "v_lin"),
    ("query_key_value",),
    ("Wqkv",),
    ("qkv_proj",),
)
HEAD_NAMES = ("classifier", "score")


@contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def _adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module, for the layers LoRA can wrap."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D)
    }


def _matching(layers: dict[str, nn.Module], target: str) -> list[nn.Module]:
    """The layers a peft target name selects: the name itself or a dotted suffix of it."""
    return [m for name, m in layers.items() if name == target or name.endswith("." + target)]


def target_modules(
    model: nn.Module, method: FineTuneMethod, requested: list[str] | None
) -> list[str]:
    layers = _adaptable_layers(model)
    short_names = sorted({name.rsplit(".", 1)[-1] for name in layers})
    if requested:
        missing = [name for name in requested if not _matching(layers, name)]
        if missing:
            raise PermanentJobError(
                f"lora.target_modules {missing} are not linear layers of this model "
                f"(it has: {', '.join(short_names)})",
                FailureType.INVALID_SPEC,
            )
        return list(requested)
    mapping = (
        TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING
        if method is FineTuneMethod.ADALORA
        else TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in mapping:
        return list(mapping[model_type])
    for names in FALLBACK_TARGETS:
        if all(_matching(layers, name) for name in names):
            return list(names)
    raise PermanentJobError(
        f"no default LoRA target modules for model type {model_type!r}; set "
        f"lora.target_modules (linear layers: {', '.join(short_names)})",
        FailureType.INVALID_SPEC,
    )


def build_peft_config(
    model: nn.Module,
    task: FineTuneTask,
    method: FineTuneMethod,
    lora: LoraSpec,
    total_steps: int,
) -> PeftConfig:
    targets = target_modules(model, method, lora.target_modules)
    layers = _adaptable_layers(model)
    common: dict[str, Any] = {
        "task_type": PEFT_TASK_TYPE[task],
        "target_modules": targets,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        # GPT-2 style Conv1D layers store weights transposed.
        "fan_in_fan_out": any(
            isinstance(layer, Conv1D) for name in targets for layer in _matching(layers, name)
        ),
    }
    heads = [name for name, _ in model.named_children() if name in HEAD_NAMES]
    if task is not FineTuneTask.CAUSAL_LM and heads:
        common["modules_to_save"] = heads
    if method is FineTuneMethod.ADALORA:
        return AdaLoraConfig(
            init_r=max(lora.r * 3 // 2, lora.r),
            target_r=lora.r,
            total_step=total_steps,
            tinit=total_steps // 10,
            tfinal=total_steps // 5,
            **common,
        )
    return LoraConfig(r=lora.r, **common)


def apply_method(
    model: nn.Module,
    task: FineTuneTask,
    method: FineTuneMethod,
    lora: LoraSpec,
    total_steps: int,
    adapter: str | None,
) -> nn.Module:
    """Full: the model itself (an existing adapter merged in). LoRA/AdaLoRA: a new adapter,
    or the existing one trained further (an AdaLoRA one on this run's step budget)."""
    if adapter is not None:
        config = PeftConfig.from_pretrained(adapter)
        if isinstance(config, AdaLoraConfig):
            config.total_step = total_steps
            config.tinit, config.tfinal = total_steps // 10, total_steps // 5
        trainable = method is not FineTuneMethod.FULL
        try:
            with quiet_peft_deprecations():
                peft_model = PeftModel.from_pretrained(
                    model, adapter, is_trainable=trainable, config=config
                )
        except (OSError, ValueError, RuntimeError) as exc:
            raise PermanentJobError(
                f"cannot load adapter {adapter!r}: {exc}", FailureType.MODEL_NOT_FOUND
            ) from exc
        if trainable:
            return peft_model
        merged: nn.Module = peft_model.merge_and_unload()
        return merged
    if method is FineTuneMethod.FULL:
        return model
    config = build_peft_config(model, task, method, lora, total_steps)
    with quiet_peft_deprecations():
        peft_model = get_peft_model(model, config)
    trainable_params, all_params = peft_model.get_nb_trainable_parameters()
    logger.info(
        "%s adapter on %s: %d of %d parameters trainable",
        method.value,
        ", ".join(sorted(getattr(config, "target_modules", None) or [])),
        trainable_params,
        all_params,
    )
    return peft_model


def set_orth_reg_weight(model: nn.Module, weight: float) -> float | None:
    """Sets the weight of AdaLoRA's orthogonality penalty; the previous one (None: not AdaLoRA)."""
    if not is_adalora(model):
        return None
    config: Any = model.active_peft_config  # type: ignore[union-attr]
    previous = float(config.orth_reg_weight)
    config.orth_reg_weight = weight
    return previous


@contextmanager
def without_orth_regularization(model: nn.Module) -> Iterator[None]:
    """AdaLoRA adds its orthogonality penalty to every loss, eval loss included; evaluations
    (and perplexity) should see the model's own loss."""
    previous = set_orth_reg_weight(model, 0.0)
    try:
        yield
    finally:
        if previous is not None:
            set_orth_reg_weight(model, previous)


def is_adalora(model: nn.Module) -> bool:
    return isinstance(model, PeftModel) and isinstance(
        model.peft_config.get("default"), AdaLoraConfig
    )
