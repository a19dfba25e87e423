"""Preference tuning (objective `dpo`): pairs encoded like supervised rows, TRL's DPOTrainer
with the same atomic checkpoints, and the final evaluation's figures.

Rows are tokenized here, not by TRL, so a preference pair is cut and rendered the way a
supervised prompt/completion or chat row is (workers/training/data.py): the prompt loses its
start first, an eos is added only when the tokenizer has one, and a conversation without a
chat template is rendered as `role: content` lines.

This module imports TRL (and `datasets`); the runner imports it only for a DPO job.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel
from transformers.trainer_callback import TrainerCallback
from trl.trainer.dpo_config import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer

from core.enums import FailureType
from core.errors import PermanentJobError
from core.example_tokens import eos_ids, render_chat, token_ids
from core.specs import FineTuneSpec
from workers.training.checkpoints import AtomicCheckpointTrainer
from workers.training.data import Feature, FeatureDataset
from workers.training.peft_setup import is_adalora
from workers.training.schedule import Schedule, argument_values, with_best_model

logger = logging.getLogger(__name__)

REFERENCE_ADAPTER = "ref"
"""The name TRL gives its frozen copy of an adapter the policy starts from."""

Messages = list[dict[str, str]]


def _conversation_texts(
    tokenizer: Any, prompt: Messages, answers: tuple[Messages, Messages]
) -> tuple[str, list[str], bool]:
    """The prompt as text (ending where the assistant's turn starts) and each whole
    conversation as text; whether they came from the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None):
        prompt_text = str(
            tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        )
        wholes = [str(tokenizer.apply_chat_template(prompt + a, tokenize=False)) for a in answers]
        return prompt_text, wholes, True
    prompt_text = render_chat(tokenizer, prompt)[0] + "\n"
    return prompt_text, [render_chat(tokenizer, prompt + a)[0] for a in answers], False


def _shared_start(*texts: str) -> int:
    """How many leading characters all `texts` have in common."""
    shortest = min(len(t) for t in texts)
    for i in range(shortest):
        if len({t[i] for t in texts}) > 1:
            return i
    return shortest


def encode_preference(tokenizer: Any, row: dict[str, Any], max_length: int) -> Feature:
    """A preference row (three texts, or three message lists) as TRL's `prompt_ids`,
    `chosen_ids`, `rejected_ids`. Too long: the prompt loses its start first, but the answers
    keep at least half of `max_length`."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, list):
        prompt_text, wholes, templated = _conversation_texts(tokenizer, prompt, (chosen, rejected))
        # A template may render the prompt alone differently: split where all three agree.
        cut = _shared_start(prompt_text, *wholes)
        prompt_text, answers = prompt_text[:cut], [whole[cut:] for whole in wholes]
        prompt_ids = token_ids(tokenizer, prompt_text, not templated)
    else:
        prompt_ids, answers = token_ids(tokenizer, prompt, True), [chosen, rejected]
    chosen_ids, rejected_ids = (
        token_ids(tokenizer, a, False) + eos_ids(tokenizer) for a in answers
    )
    longest = max(len(chosen_ids), len(rejected_ids))
    keep_answer = min(longest, max(max_length - len(prompt_ids), max_length // 2))
    keep_prompt = min(len(prompt_ids), max_length - keep_answer)
    return {
        "prompt_ids": prompt_ids[len(prompt_ids) - keep_prompt :],
        "chosen_ids": chosen_ids[:keep_answer],
        "rejected_ids": rejected_ids[:keep_answer],
    }


def encode_preferences(
    tokenizer: Any, rows: list[dict[str, Any]], max_length: int
) -> list[Feature]:
    """Pairs whose answers both keep a token (a template can render two answers alike)."""
    features = [encode_preference(tokenizer, row, max_length) for row in rows]
    kept = [f for f in features if f["chosen_ids"] and f["rejected_ids"]]
    if len(kept) < len(features):
        logger.warning("%d of %d pairs had an empty answer", len(features) - len(kept), len(rows))
    return kept


class PreferenceTrainer(AtomicCheckpointTrainer, DPOTrainer):
    """TRL's DPOTrainer whose checkpoints are written whole or not at all:
    AtomicCheckpointTrainer's `_save_checkpoint` comes first in the method order and
    calls down to DPOTrainer's and Trainer's inside its staging directory."""

    def _prepare_dataset(
        self, dataset: Any, processing_class: Any, args: Any, dataset_name: str
    ) -> Any:
        """Rows arrive tokenized by `encode_preference`."""
        return dataset

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """No README.md beside the checkpoints: the registry describes the model."""


def dpo_arguments(
    spec: FineTuneSpec, schedule: Schedule, output_dir: Path, device: str, world_size: int
) -> DPOConfig:
    """The supervised arguments (DPOConfig's own defaults for learning rate, bf16 and
    activation checkpointing do not apply), plus beta and the length the pairs were cut to."""
    return with_best_model(
        DPOConfig(
            **argument_values(spec, schedule, output_dir, device, world_size),
            beta=spec.dpo_settings.beta,
            max_length=spec.hyperparameters.max_length,
            activation_checkpointing=False,
        )
    )


def preference_trainer(
    model: torch.nn.Module,
    new_adapter: PeftConfig | None,
    tokenizer: Any,
    train: FeatureDataset,
    validation: FeatureDataset,
    args: DPOConfig,
    callbacks: list[TrainerCallback],
) -> PreferenceTrainer:
    """The reference is the starting weights. Full fine-tune: a frozen copy of them. A new
    adapter (`new_adapter`, which TRL adds to `model`): the same model with the adapter
    disabled. An adapter trained further (`model` is a PeftModel): TRL's frozen copy of it
    beside it, which peft allows for LoRA only (one trainable AdaLoRA adapter per model)."""
    if is_adalora(model):
        raise PermanentJobError(
            "DPO cannot train an AdaLoRA adapter further: its reference would be a second "
            "AdaLoRA adapter on the model, which peft refuses; use method full (the adapter "
            "merged in) or a new lora/adalora adapter on the merged model",
            FailureType.INVALID_SPEC,
        )
    policy: Any = model
    reference: Any = None
    if new_adapter is None and not isinstance(model, PeftModel):
        reference = copy.deepcopy(model).requires_grad_(False).eval()
    return PreferenceTrainer(
        model=policy,
        ref_model=reference,
        peft_config=new_adapter,
        args=args,
        train_dataset=Dataset.from_list(train.features),
        eval_dataset=Dataset.from_list(validation.features),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def drop_reference_adapter(model: torch.nn.Module) -> None:
    """The saved model holds the trained adapter only, not TRL's frozen copy of it."""
    if isinstance(model, PeftModel) and REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)
