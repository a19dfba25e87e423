"""Runs a FineTuneSpec with transformers' Trainer (or TRL's DPOTrainer for objective dpo,
GRPOTrainer for objective reinforcement): full, LoRA or AdaLoRA; resumable."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig
from pydantic import ValidationError
from transformers import PrinterCallback, Trainer, set_seed
from transformers.trainer_callback import EarlyStoppingCallback, TrainerCallback

from core.enums import FailureType, FineTuneMethod, FineTuneObjective, FineTuneTask
from core.errors import PermanentJobError, StaleAttempt
from core.settings import Settings
from core.specs import FineTuneSpec
from workers.context import RunContext
from workers.failures import is_out_of_memory
from workers.runners import RunResult, TrainedModel, discard_model
from workers.training.callbacks import (
    AdaLoraCallback,
    CheckpointCallback,
    MetricsCallback,
    ProgressCallback,
    StepMarkerCallback,
    StopCallback,
    ThroughputCallback,
)
from workers.training.data import (
    Feature,
    FeatureDataset,
    PaddingCollator,
    SplitRows,
    encode_rows,
    load_split,
    pad_token_id,
)
from workers.training.evaluation import (
    FineTuneTrainer,
    argmax_logits,
    final_report,
    flat_figures,
    trl_report,
)
from workers.training.exact_match import ExactMatchSet, exact_match_set
from workers.training.io import CheckpointInfo, TrainingIO
from workers.training.layout import CHECKPOINTS_DIR, MODEL_DIR, STEP_MARKER
from workers.training.models import (
    WeightsSource,
    load_base_model,
    load_tokenizer,
    require_safetensors,
    weights_source,
)
from workers.training.packing import (
    PackedCollator,
    PackedDataset,
    pack_features,
    require_isolation,
)
from workers.training.peft_setup import apply_method, build_peft_config, is_adalora
from workers.training.reports import compute_metrics_for
from workers.training.schedule import Schedule, plan_schedule, precision_for, training_arguments
from workers.training.selection import ResumedBestCallback, best_checkpoint, resumed_best
from workers.training.throughput import ThroughputLog, estimate_training, measured, setup_key
from workers.training.tracking import Tracking, trackers_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """Everything the Trainer is built from."""

    split: SplitRows
    source: WeightsSource
    tokenizer: Any
    model: torch.nn.Module
    train: FeatureDataset
    validation: FeatureDataset
    schedule: Schedule
    pad_id: int
    new_adapter: PeftConfig | None = None  # DPO: the adapter TRL adds to `model` itself
    exact_match: ExactMatchSet | None = None  # the completions each evaluation scores


def _model_of(trainer: Trainer) -> torch.nn.Module:
    """The model `trainer` trains: the prepared one, or for DPO with a new adapter the
    PeftModel TRL made of it."""
    model = trainer.model
    if model is None:
        raise PermanentJobError("the trainer holds no model", FailureType.RUNTIME_ERROR)
    return model


def _preference() -> Any:
    """workers.training.preference, imported for a DPO job only: it loads TRL and `datasets`,
    about a second that a supervised job need not spend."""
    from workers.training import preference

    return preference


def _reinforcement() -> Any:
    """workers.training.reinforcement, imported for a reinforcement job only (TRL)."""
    from workers.training import reinforcement

    return reinforcement


def example_tokens(feature: Feature) -> int:
    """The tokens one example trains on: its input ids, a preference pair's prompt twice
    (once before each answer) and both answers, or at most a reinforcement prompt's sampled
    completions, each with the prompt."""
    if "input_ids" in feature:
        return len(feature["input_ids"])
    if "tokens_at_most" in feature:
        return int(feature["tokens_at_most"])
    prompt, chosen, rejected = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
    return 2 * len(prompt) + len(chosen) + len(rejected)


def select_device(device: str) -> None:
    """Trainer runs on the current CUDA device; `cuda:N` makes N current."""
    if device.startswith("cuda:"):
        torch.cuda.set_device(int(device.split(":", 1)[1]))


def save_final_model(model: torch.nn.Module, tokenizer: Any, model_dir: Path) -> None:
    """The model (or only its adapter) and tokenizer, safetensors only: Trainer.save_model
    would add a pickled training_args.bin."""
    model_dir.mkdir(parents=True, exist_ok=True)
    save = getattr(model, "save_pretrained", None)
    if save is None:
        raise PermanentJobError(f"cannot save a {type(model).__name__}", FailureType.RUNTIME_ERROR)
    save(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))


class FineTuneRunner:
    """Trains in this process. In a worker it runs in each of the ranks torchrun started
    (workers/training/child.py): `world_size` ranks share the batch size, and `callbacks`
    (the ranks' stop agreement) come before the one that stops training."""

    def __init__(
        self,
        settings: Settings,
        io_factory: Callable[[RunContext], TrainingIO],
        world_size: int = 1,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> None:
        self._settings = settings
        self._io_factory = io_factory
        self._world_size = world_size
        self._callbacks = list(callbacks)

    def run(self, raw_spec: dict[str, Any], ctx: RunContext) -> RunResult:
        try:
            spec = FineTuneSpec.model_validate(raw_spec)
        except ValidationError as exc:
            raise PermanentJobError(
                f"invalid fine-tune spec: {exc}", FailureType.INVALID_SPEC
            ) from exc
        io = self._io_factory(ctx)
        try:
            result = self._run(spec, ctx, io)
        except Exception as exc:
            try:
                io.close()  # metrics and checkpoint records buffered during an outage
            except Exception as close_exc:
                logger.warning("job %s: buffered records not written: %s", ctx.job_id, close_exc)
            if is_out_of_memory(exc):
                raise PermanentJobError(
                    f"out of memory on {ctx.device}: {exc}", FailureType.OUT_OF_MEMORY
                ) from exc
            raise
        try:
            io.close()
        except BaseException:  # the records were not all written: no row will name the model
            discard_model(result)
            raise
        if ctx.lease_lost:  # the last buffered records were refused: the model is not kept
            discard_model(result)
            raise StaleAttempt(f"job {ctx.job_id}: attempt {ctx.attempt} lost the job")
        return result

    def _run(self, spec: FineTuneSpec, ctx: RunContext, io: TrainingIO) -> RunResult:
        hp = spec.hyperparameters
        select_device(ctx.device)
        set_seed(hp.seed)
        prepared = self._prepare(spec, io)
        ctx.check_stop()
        output_dir = io.work_dir / CHECKPOINTS_DIR
        clocked = ThroughputCallback()
        trainer = self._trainer(spec, prepared, ctx, io, output_dir, clocked)
        trackers = trackers_for(spec, self._settings)
        tracking = Tracking(trackers, self._settings, ctx, io, trainer.is_world_process_zero())
        for callback in tracking.start(spec):
            trainer.add_callback(callback)
        try:
            result = self._train(spec, prepared, ctx, io, trainer, clocked)
        except BaseException as exc:
            tracking.end(trainer, exc)
            raise
        tracking.end(trainer, None)
        assert result.result is not None
        result.result["tracking"] = tracking.result()
        return result

    def _train(
        self,
        spec: FineTuneSpec,
        prepared: Prepared,
        ctx: RunContext,
        io: TrainingIO,
        trainer: Trainer,
        clocked: ThroughputCallback,
    ) -> RunResult:
        resume = io.latest_checkpoint()  # read where it lies: nothing of it is copied
        steps_redone = 0
        if resume is not None:
            steps_redone = io.discard_after(resume.step) - resume.step
        throughputs = ThroughputLog(self._settings.data_dir)
        setup = setup_key(spec.base_model, ctx.device, self._world_size)
        estimate = estimate_training(
            prepared.schedule,
            [example_tokens(feature) for feature in prepared.train.features],
            resume.step if resume is not None else 0,
            setup,
            throughputs.last(setup),
        )
        self._announce(spec, prepared, ctx, io, resume, steps_redone, estimate)
        if resume is not None:
            self._keep_resumed_best(spec, trainer, ctx, io, resume)
        ctx.check_stop()
        output = trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
        ctx.check_stop()
        attempt_throughput = measured(
            ctx.job_id, spec.method.value, clocked.tokens, clocked.seconds
        )
        if trainer.is_world_process_zero() and attempt_throughput is not None:
            throughputs.record(setup, attempt_throughput)
        best = best_checkpoint(trainer.state, spec.best_model_metric)
        if best is not None:
            io.event(f"the model is the best checkpoint, step {best.step}", best.as_result())

        for recorder in (MetricsCallback, CheckpointCallback):
            trainer.remove_callback(recorder)
        trained = _model_of(trainer)
        if spec.objective is not FineTuneObjective.SUPERVISED:
            report, eval_loss = trl_report(trainer, trained)
            if spec.objective is FineTuneObjective.DPO:
                _preference().drop_reference_adapter(trained)
        else:
            report, eval_loss = final_report(
                trainer, trained, spec.task, prepared.validation, prepared.split.labels
            )
        figures = flat_figures(report, eval_loss)
        io.event("final evaluation", figures)
        model_dir = io.work_dir / MODEL_DIR
        final = trained
        adapter = spec.method is not FineTuneMethod.FULL
        if adapter and spec.merge_adapter:
            peft_model: Any = final
            final = peft_model.merge_and_unload()
            adapter = False
        if trainer.is_world_process_zero():
            save_final_model(final, prepared.tokenizer, model_dir)
            kind = "adapter" if adapter else "model"
            io.event(f"saved the {spec.method.value} {kind}", {"path": MODEL_DIR})
        train_figures = {
            "train_runtime": float(output.metrics.get("train_runtime", 0.0)),
            "train_samples_per_second": float(output.metrics.get("train_samples_per_second", 0.0)),
            "global_step": int(output.global_step),
            "train_loss": float(output.training_loss),
            "tokens_per_s": attempt_throughput.tokens_per_s if attempt_throughput else None,
        }
        logger.info("job %s trained: %s", ctx.job_id, train_figures)
        return RunResult(
            result={
                "task": spec.task.value,
                "method": spec.method.value,
                "objective": spec.objective.value,
                "train": train_figures,
                "eval": report,
                "best_checkpoint": best.as_result() if best is not None else None,
                "trained_tokens": int(trainer.state.num_input_tokens_seen),
                "resumed_from_step": resume.step if resume else None,
                "steps_redone": steps_redone,
            },
            trained_model=TrainedModel(
                path=model_dir.resolve(),
                base_model=spec.base_model,
                task=spec.task,
                method=spec.method,
                labels=list(prepared.split.labels),
                metrics=figures,
                adapter=adapter,
            ),
        )

    def _prepare(self, spec: FineTuneSpec, io: TrainingIO) -> Prepared:
        hp = spec.hyperparameters
        split = load_split(io, spec)
        resolved = io.resolve_model(spec.base_model)
        start: CheckpointInfo | None = None
        if spec.from_checkpoint is not None:
            start = io.checkpoint_of(spec.from_checkpoint.job_id, spec.from_checkpoint.step)
        source = weights_source(resolved, start)
        require_safetensors(source.base)
        if source.adapter is not None:
            require_safetensors(source.adapter)
        tokenizer = load_tokenizer(source.tokenizer)
        pad_id = pad_token_id(tokenizer)
        if spec.objective is FineTuneObjective.DPO:
            encode = _preference().encode_preferences
            train = encode(tokenizer, split.train, hp.max_length)
            validation = encode(tokenizer, split.validation, hp.max_length)
        elif spec.objective is FineTuneObjective.REINFORCEMENT:
            prompts = _reinforcement().encode_prompts
            train = prompts(tokenizer, split.train, spec, spec.training_dataset)
            validation = prompts(
                tokenizer,
                split.validation,
                spec,
                spec.validation_dataset or spec.training_dataset,
            )
        else:
            train = encode_rows(
                tokenizer,
                split.schema,
                split.train,
                split.labels,
                hp.max_length,
                hp.train_on_inputs,
            )
            validation = encode_rows(
                tokenizer,
                split.schema,
                split.validation,
                split.labels,
                hp.max_length,
                hp.train_on_inputs,
            )
        if not train or not validation:
            which = "training" if not train else "validation"
            raise PermanentJobError(
                f"no {which} row has a token to learn from", FailureType.INVALID_SPEC
            )
        scored = None
        if spec.exact_match is not None:
            scored = exact_match_set(
                tokenizer, split.schema, split.validation, spec.exact_match, hp.max_length
            )
        train_set = pack_features(train, hp.max_length) if hp.packing else FeatureDataset(train)
        schedule = plan_schedule(hp, len(train_set), self._world_size)
        model = load_base_model(spec.task, source.base, split.labels)
        if hp.packing:
            require_isolation(model)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = pad_id
        new_adapter = None
        if (
            spec.objective is FineTuneObjective.DPO
            and spec.method is not FineTuneMethod.FULL
            and source.adapter is None
        ):
            # TRL adds it, so that the reference is this model with the adapter disabled.
            new_adapter = build_peft_config(
                model, spec.task, spec.method, spec.lora, schedule.total_steps
            )
        else:
            model = apply_method(
                model, spec.task, spec.method, spec.lora, schedule.total_steps, source.adapter
            )
        return Prepared(
            split=split,
            source=source,
            tokenizer=tokenizer,
            model=model,
            train=train_set,
            validation=FeatureDataset(validation),
            schedule=schedule,
            pad_id=pad_id,
            new_adapter=new_adapter,
            exact_match=scored,
        )

    def _trainer(
        self,
        spec: FineTuneSpec,
        prepared: Prepared,
        ctx: RunContext,
        io: TrainingIO,
        output_dir: Path,
        clocked: ThroughputCallback,
    ) -> Trainer:
        hp = spec.hyperparameters
        callbacks: list[TrainerCallback] = [
            ProgressCallback(ctx),
            clocked,
            MetricsCallback(io),
            CheckpointCallback(
                io, hp.checkpoint_minutes * 60 if hp.checkpoint_minutes is not None else None
            ),
            *self._callbacks,
            StopCallback(ctx),
            StepMarkerCallback(io.work_dir / STEP_MARKER),
        ]
        if is_adalora(prepared.model):
            callbacks.append(AdaLoraCallback())
        if spec.early_stopping is not None:
            callbacks.append(
                EarlyStoppingCallback(
                    early_stopping_patience=spec.early_stopping.patience,
                    early_stopping_threshold=spec.early_stopping.threshold,
                )
            )
        if spec.objective is FineTuneObjective.DPO:
            preference = _preference()
            trainer: Trainer = preference.preference_trainer(
                prepared.model,
                prepared.new_adapter,
                prepared.tokenizer,
                prepared.train,
                prepared.validation,
                preference.dpo_arguments(
                    spec, prepared.schedule, output_dir, ctx.device, self._world_size
                ),
                callbacks,
            )
            trainer.remove_callback(PrinterCallback)
            if prepared.new_adapter is not None and is_adalora(_model_of(trainer)):
                trainer.add_callback(AdaLoraCallback())
            return trainer
        if spec.objective is FineTuneObjective.REINFORCEMENT:
            reinforcement = _reinforcement()
            trainer = reinforcement.reinforcement_trainer(
                prepared.model,
                prepared.tokenizer,
                prepared.train,
                prepared.validation,
                reinforcement.grpo_arguments(
                    spec, prepared.schedule, output_dir, ctx.device, self._world_size
                ),
                callbacks,
                spec.reinforcement_settings.grader,
            )
            trainer.remove_callback(PrinterCallback)
            return trainer
        trainer = FineTuneTrainer(
            model=prepared.model,
            args=training_arguments(
                spec, prepared.schedule, output_dir, ctx.device, self._world_size
            ),
            data_collator=(
                PackedCollator(prepared.pad_id)
                if spec.hyperparameters.packing
                else PaddingCollator(prepared.pad_id)
            ),
            train_dataset=prepared.train,
            eval_dataset=prepared.validation,
            processing_class=prepared.tokenizer,
            compute_metrics=compute_metrics_for(spec.task, prepared.split.labels),
            preprocess_logits_for_metrics=(
                None if spec.task is FineTuneTask.CAUSAL_LM else argmax_logits
            ),
            callbacks=callbacks,
            with_perplexity=spec.task is FineTuneTask.CAUSAL_LM,
            exact_match=prepared.exact_match,
            pad_id=prepared.pad_id,
        )
        trainer.remove_callback(PrinterCallback)
        return trainer

    def _keep_resumed_best(
        self,
        spec: FineTuneSpec,
        trainer: Trainer,
        ctx: RunContext,
        io: TrainingIO,
        resume: CheckpointInfo,
    ) -> None:
        """The best checkpoint so far may be an earlier attempt's (selection.py)."""
        best = resumed_best(io, ctx.job_id, resume)
        if best is None:
            return
        trainer.add_callback(ResumedBestCallback(best))
        data = {"step": best.step, "metric": spec.best_model_metric, "score": best.score}
        if best.path is None:
            logger.warning("job %s: best checkpoint of step %d is gone", ctx.job_id, best.step)
            io.event(
                f"the best checkpoint so far, step {best.step}, is gone; the best is chosen "
                "again among the evaluations from here on",
                data,
            )
        elif best.step != resume.step:
            io.event(f"the best checkpoint so far is step {best.step}", data)

    def _announce(
        self,
        spec: FineTuneSpec,
        prepared: Prepared,
        ctx: RunContext,
        io: TrainingIO,
        resume: CheckpointInfo | None,
        steps_redone: int,
        estimate: dict[str, Any],
    ) -> None:
        """The first event: what trains where, and the estimate (planned steps and tokens,
        and an ETA at the throughput this host last measured for this setup, or why not)."""
        data: dict[str, Any] = {
            "task": spec.task.value,
            "method": spec.method.value,
            "objective": spec.objective.value,
            "weights": prepared.source.origin,
            "train_rows": len(prepared.train),
            "validation_rows": len(prepared.validation),
            "validation": prepared.split.validation_source,
            "labels": len(prepared.split.labels),
            "total_steps": prepared.schedule.total_steps,
            "device": ctx.device,
            "processes": self._world_size,
            "precision": precision_for(ctx.device).name,
            "estimate": estimate,
        }
        if isinstance(prepared.train, PackedDataset):
            data["train_rows"] = prepared.train.examples
            data["packed_sequences"] = len(prepared.train)
            data["packing_fill"] = round(prepared.train.fill, 4)
        io.event("training started", data)
        if resume is not None:
            io.event(
                f"resuming from step {resume.step}",
                {"step": resume.step, "path": resume.path.name, "steps_redone": steps_redone},
            )
