"""Reinforcement fine-tuning (objective `reinforcement`): TRL's GRPOTrainer with the same
atomic checkpoints, sampling completions of each prompt and rewarding them with the job's
grader (workers/training/grading.py).

Prompts are rendered here, as preference and supervised chat rows are: with the model's
chat template (ending where the assistant's turn starts), else as `role: content` lines
followed by `assistant:`. The row travels beside its prompt as JSON (the `item` column),
which TRL hands to the reward function with each completion.

This module imports TRL (and `datasets`); the runner imports it only for such a job.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers.trainer_callback import TrainerCallback
from trl.trainer.grpo_config import GRPOConfig
from trl.trainer.grpo_trainer import GRPOTrainer

from core.enums import FailureType
from core.errors import PermanentJobError
from core.example_tokens import render_generation_prompt, token_ids
from core.specs import FineTuneSpec
from workers.training.checkpoints import AtomicCheckpointTrainer
from workers.training.data import Feature, FeatureDataset
from workers.training.grading import AnyGrader, GraderReward
from workers.training.schedule import Schedule, argument_values, with_best_model

logger = logging.getLogger(__name__)


def encode_prompts(
    tokenizer: Any, rows: list[dict[str, Any]], spec: FineTuneSpec, dataset: str
) -> list[Feature]:
    """Each row as its prompt text, the row as JSON (`item`), and the most tokens it trains
    on per epoch (`tokens_at_most`: each sampled completion at its longest, with the prompt).
    A prompt keeps its last `max_length - max_completion_tokens` tokens. Every field the
    grader names must be in every row."""
    settings = spec.reinforcement_settings
    needed = settings.grader.item_fields
    keep = spec.hyperparameters.max_length - settings.max_completion_tokens
    features: list[Feature] = []
    for index, row in enumerate(rows):
        missing = sorted(needed - set(row))
        if missing:
            raise PermanentJobError(
                f"row {index + 1} of dataset {dataset} has no field {', '.join(missing)}, "
                "which the grader names",
                FailureType.INVALID_SPEC,
            )
        text = render_generation_prompt(tokenizer, row["messages"])[0]
        prompt, prompt_tokens = _cut(tokenizer, text, keep)
        sampled = prompt_tokens + settings.max_completion_tokens
        features.append(
            {
                "prompt": prompt,
                "item": json.dumps(row, ensure_ascii=False),
                "tokens_at_most": settings.generations * sampled,
            }
        )
    return features


def _cut(tokenizer: Any, prompt: str, keep: int) -> tuple[str, int]:
    """The prompt, or its last `keep` tokens as text; and its token count."""
    ids = token_ids(tokenizer, prompt, True)
    if len(ids) <= keep:
        return prompt, len(ids)
    return str(tokenizer.decode(ids[len(ids) - keep :])), keep


class ReinforcementTrainer(AtomicCheckpointTrainer, GRPOTrainer):
    """TRL's GRPOTrainer whose checkpoints are written whole or not at all:
    AtomicCheckpointTrainer's `_save_checkpoint` comes first in the method order and calls
    down to GRPOTrainer's and Trainer's inside its staging directory."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """A tokenizer without an eos token: TRL would stop completions at token `None`
        (which `generate` refuses); they run to max_completion_tokens instead."""
        super().__init__(*args, **kwargs)
        if None in self.eos_token_ids:
            self.eos_token_ids = [t for t in self.eos_token_ids if t is not None]
            self.generation_kwargs["eos_token_id"] = self.eos_token_ids or None
            self.generation_config.eos_token_id = self.eos_token_ids or None

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """No README.md beside the checkpoints: the registry describes the model."""


def completions_per_device(spec: FineTuneSpec, world_size: int) -> int:
    """`batch_size` counts prompts per step; each brings `generations` completions, and each
    process takes whole groups of them."""
    generations = spec.reinforcement_settings.generations
    return generations * math.ceil(spec.hyperparameters.batch_size / world_size)


def grpo_arguments(
    spec: FineTuneSpec, schedule: Schedule, output_dir: Path, device: str, world_size: int
) -> GRPOConfig:
    """The supervised arguments (GRPOConfig's own defaults for learning rate, bf16 and
    gradient checkpointing do not apply), a batch of whole groups, and the sampling. TRL
    counts the trained tokens itself: every sampled completion with its prompt."""
    settings = spec.reinforcement_settings
    values = argument_values(spec, schedule, output_dir, device, world_size)
    batch = completions_per_device(spec, world_size)
    values.update(
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        include_num_input_tokens_seen="no",
    )
    return with_best_model(
        GRPOConfig(
            **values,
            num_generations=settings.generations,
            max_completion_length=settings.max_completion_tokens,
            temperature=settings.temperature,
            activation_checkpointing=False,
            log_completions=False,
        )
    )


def reinforcement_trainer(
    model: torch.nn.Module,
    tokenizer: Any,
    train: FeatureDataset,
    validation: FeatureDataset,
    args: GRPOConfig,
    callbacks: list[TrainerCallback],
    grader: AnyGrader,
) -> ReinforcementTrainer:
    """With beta 0 (TRL's default) GRPO needs no reference model: a LoRA or AdaLoRA adapter
    is added before, as for supervised jobs."""
    return ReinforcementTrainer(
        model=model,
        reward_funcs=[GraderReward(grader)],
        args=args,
        train_dataset=Dataset.from_list(train.features),
        eval_dataset=Dataset.from_list(validation.features),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
