"""Step counts and the Trainer arguments they lead to (evaluation, checkpoints, precision)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import TrainingArguments

from core.specs import FineTuneSpec, Hyperparameters

ArgumentsT = TypeVar("ArgumentsT", bound=TrainingArguments)

LOG_POINTS_PER_RUN = 200
SAVE_TOTAL_LIMIT = 3


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    logging_steps: int
    eval_steps: int | None  # None: once per epoch
    save_steps: int | None  # None: once per epoch


def per_device_batch(batch_size: int, world_size: int) -> int:
    """`batch_size` is the whole step's: each of `world_size` processes takes its share
    (rounded up, so a step never holds fewer rows than asked)."""
    return math.ceil(batch_size / world_size)


def plan_schedule(hp: Hyperparameters, n_train: int, world_size: int = 1) -> Schedule:
    """The optimizer steps Trainer will take, and when it evaluates and saves: checkpoints
    follow evaluations unless `checkpoint_steps` is set (an evaluation that is the best so
    far is saved in any case: CheckpointCallback). With several processes each step's batch
    is split between them (accelerate shards every batch), so they take as many steps as one
    process would. `n_train` is the training dataset's length: packed sequences when the
    job packs, so epochs stay passes over the rows."""
    rows_per_process = math.ceil(n_train / world_size)
    batches = math.ceil(rows_per_process / per_device_batch(hp.batch_size, world_size))
    steps_per_epoch = max(math.ceil(batches / hp.gradient_accumulation_steps), 1)
    total = hp.max_steps or math.ceil(hp.epochs * steps_per_epoch)
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=math.ceil(hp.warmup * total),
        logging_steps=max(1, total // LOG_POINTS_PER_RUN),
        eval_steps=hp.eval_steps,
        save_steps=hp.checkpoint_steps or hp.eval_steps,
    )


@dataclass(frozen=True)
class Precision:
    use_cpu: bool
    bf16: bool
    fp16: bool

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def precision_for(device: str) -> Precision:
    """bf16 where the GPU has it, else fp16; fp32 on CPU."""
    if not device.startswith("cuda"):
        return Precision(use_cpu=True, bf16=False, fp16=False)
    bf16 = bool(torch.cuda.is_bf16_supported())
    return Precision(use_cpu=False, bf16=bf16, fp16=not bf16)


def training_arguments(
    spec: FineTuneSpec, schedule: Schedule, output_dir: Path, device: str, world_size: int = 1
) -> TrainingArguments:
    """Trainer's arguments. Trainer tracks the best evaluation on the spec's metric (the
    task's default when none is named), keeps its checkpoint out of rotation and loads it
    when training ends, so the model is the best checkpoint; early stopping watches the
    same metric."""
    return with_best_model(
        TrainingArguments(**argument_values(spec, schedule, output_dir, device, world_size))
    )


def with_best_model(args: ArgumentsT) -> ArgumentsT:
    """Set after the arguments' own checks: they refuse load_best_model_at_end unless every
    evaluation falls on a save, lest the best one have no checkpoint to load. Here
    `checkpoint_steps` keeps its meaning, and CheckpointCallback saves each evaluation that
    is the best so far instead."""
    args.load_best_model_at_end = True
    return args


def argument_values(
    spec: FineTuneSpec, schedule: Schedule, output_dir: Path, device: str, world_size: int = 1
) -> dict[str, Any]:
    """The TrainingArguments fields every fine-tune sets (a DPOConfig takes them too)."""
    hp = spec.hyperparameters
    precision = precision_for(device)
    batch = per_device_batch(hp.batch_size, world_size)
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay,
        warmup_steps=schedule.warmup_steps,
        logging_strategy="steps",
        logging_steps=schedule.logging_steps,
        logging_first_step=True,
        # trained tokens: attention-mask ones of every batch, summed over the ranks, kept in
        # the checkpoints' trainer state so a resumed run goes on counting
        include_num_input_tokens_seen="non_padding",
        eval_strategy="epoch" if schedule.eval_steps is None else "steps",
        eval_steps=schedule.eval_steps,
        save_strategy="epoch" if schedule.save_steps is None else "steps",
        save_steps=schedule.save_steps or 500,
        save_total_limit=SAVE_TOTAL_LIMIT,
        metric_for_best_model=spec.best_model_metric,
        greater_is_better=spec.greater_is_better,
        restore_callback_states_from_checkpoint=spec.early_stopping is not None,
        seed=hp.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=precision.use_cpu,
        bf16=precision.bf16,
        fp16=precision.fp16,
    )
