"""Trainer callbacks: progress, batched metrics, evaluations and checkpoints, stop, AdaLoRA."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from workers.context import RunContext
from workers.training.checkpoints import rotate_checkpoints_of_attempt
from workers.training.io import CheckpointInfo, MetricPoint, TrainingIO
from workers.training.peft_setup import set_orth_reg_weight

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
_SPEED_SUFFIXES = ("_runtime", "_per_second", "total_flos")
_NOT_FIGURES = frozenset({"epoch", "num_input_tokens_seen"})  # the token count is the result's


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def eval_figures(metrics: dict[str, Any]) -> dict[str, float]:
    """The quality figures of an evaluation (no speed figures, no epoch)."""
    figures: dict[str, float] = {}
    for name, value in metrics.items():
        number = _number(value)
        if number is None or name in _NOT_FIGURES or name.endswith(_SPEED_SUFFIXES):
            continue
        figures[name] = number
    return figures


def metric_points(logs: dict[str, Any], step: int) -> list[MetricPoint]:
    """A Trainer log entry as metric points; the end-of-training summary (whose loss is
    `train_loss`, a step's is `loss`) is not a point."""
    if "train_loss" in logs:
        return []
    epoch = _number(logs.get("epoch"))
    points: list[MetricPoint] = []
    for name, value in logs.items():
        number = _number(value)
        if number is None or name in _NOT_FIGURES or name.endswith(_SPEED_SUFFIXES):
            continue
        metric = "train_loss" if name == "loss" else name
        points.append(MetricPoint(step=step, name=metric, value=number, epoch=epoch))
    return points


def is_new_best(args: TrainingArguments, state: TrainerState, metrics: dict[str, Any]) -> bool:
    """Whether this evaluation beats the best so far on `metric_for_best_model`, by the rule
    Trainer applies right after the evaluation's callbacks (strictly better; NaN never)."""
    metric = args.metric_for_best_model
    if metric is None:
        return False
    value = _number(metrics.get(metric if metric.startswith("eval_") else f"eval_{metric}"))
    if value is None:
        return False
    if state.best_metric is None:
        return not math.isnan(value)
    return value > state.best_metric if args.greater_is_better else value < state.best_metric


class ProgressCallback(TrainerCallback):
    """Fraction done at every step, with an ETA from this run's own pace."""

    def __init__(self, ctx: RunContext, clock: Clock = time.monotonic) -> None:
        self._ctx = ctx
        self._clock = clock
        self._start = clock()
        self._start_step = 0
        self._loss: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start = self._clock()
        self._start_step = state.global_step

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and _number(logs.get("loss")) is not None:
            self._loss = float(logs["loss"])

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        total = max(state.max_steps, 1)
        done_here = state.global_step - self._start_step
        eta = samples_per_s = None
        elapsed = self._clock() - self._start
        if done_here > 0 and elapsed > 0:
            per_step = elapsed / done_here
            eta = round(per_step * max(total - state.global_step, 0), 1)
            samples = done_here * args.train_batch_size * args.gradient_accumulation_steps
            samples_per_s = round(samples / elapsed, 2)
        self._ctx.report_progress(
            state.global_step / total,
            step=state.global_step,
            total_steps=total,
            epoch=round(state.epoch or 0.0, 4),
            eta_s=eta,
            loss=self._loss,
            samples_per_s=samples_per_s,
            trained_tokens=state.num_input_tokens_seen,
        )


class ThroughputCallback(TrainerCallback):
    """The tokens this attempt trained and how long training took, start to end: Trainer's
    count of non-padding input tokens (summed over every rank) less what the checkpoint it
    resumed from had counted."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._started: tuple[float, int] | None = None
        self.tokens = 0
        self.seconds = 0.0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._started = (self._clock(), state.num_input_tokens_seen)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._started is not None:
            start, tokens = self._started
            self.seconds = self._clock() - start
            self.tokens = state.num_input_tokens_seen - tokens


class MetricsCallback(TrainerCallback):
    """Buffers logged figures and writes them in batches: every `batch_points` points or
    `batch_seconds` seconds, and at each evaluation, save and the end of training."""

    def __init__(
        self,
        io: TrainingIO,
        batch_points: int = 20,
        batch_seconds: float = 5.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._io = io
        self._batch_points = batch_points
        self._batch_seconds = batch_seconds
        self._clock = clock
        self._buffer: list[MetricPoint] = []
        self._last_flush = clock()

    def flush(self) -> None:
        if self._buffer:
            points, self._buffer = self._buffer, []
            self._io.record_metrics(points)
        self._last_flush = self._clock()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._buffer.extend(metric_points(logs or {}, state.global_step))
        due = self._clock() - self._last_flush >= self._batch_seconds
        if len(self._buffer) >= self._batch_points or (due and self._buffer):
            self.flush()

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.flush()
        self._io.event(f"evaluation at step {state.global_step}", eval_figures(metrics or {}))

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.flush()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.flush()


class CheckpointCallback(TrainerCallback):
    """Records every checkpoint Trainer writes, and asks for one when `every_s` passed and
    at each evaluation that is the best so far (its weights may become the model; Trainer
    saves only on its own schedule). Once a checkpoint's row is written under the attempt's
    fence, the attempt's older checkpoints beyond save_total_limit are removed, on disk and
    in the shared store, except the best one Trainer tracks, whatever its age (never before
    the row: an attempt that lost the job must not remove the checkpoint the attempt that
    took it over resumes from)."""

    def __init__(
        self, io: TrainingIO, every_s: float | None = None, clock: Clock = time.monotonic
    ) -> None:
        self._io = io
        self._every_s = every_s
        self._clock = clock
        self._last_save = clock()
        self._eval: tuple[int, dict[str, float]] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_save = self._clock()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._every_s is not None and self._clock() - self._last_save >= self._every_s:
            control.should_save = True

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._eval = (state.global_step, eval_figures(metrics or {}))
        if is_new_best(args, state, metrics or {}):
            control.should_save = True

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_save = self._clock()
        path = Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not path.is_dir():
            logger.warning("checkpoint %s was not written", path)
            return
        metrics = self._eval[1] if self._eval and self._eval[0] == state.global_step else {}
        recorded = self._io.record_checkpoint(
            CheckpointInfo(step=state.global_step, path=path.resolve(), metrics=metrics)
        )
        if recorded and args.should_save:
            pruned = rotate_checkpoints_of_attempt(
                path.parent, args.save_total_limit, state.best_model_checkpoint
            )
            if pruned:
                self._io.remove_pruned(pruned)
        self._io.event(
            f"checkpoint at step {state.global_step}",
            {"step": state.global_step, "path": path.name, "metrics": metrics},
        )


class StepMarkerCallback(TrainerCallback):
    """Writes the step reached to a file in the attempt's directory after every step: the
    attempt that resumes after a crash reads it to tell how many steps it redoes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._ready = False

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        if not self._ready:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._ready = True
        try:
            self._path.write_text(str(state.global_step))
        except OSError as exc:  # a full disk must not stop training for this
            logger.debug("step marker not written: %s", exc)


class StopCallback(TrainerCallback):
    """Once the job must stop, end training at the end of this step. Cancel, pause, time
    limit and hand-back save a checkpoint first (the job may go on from it); a lost lease
    saves, evaluates and logs nothing: another attempt may hold the job.

    It must come after every callback that asks for a save (CheckpointCallback), so that
    its word on a lost lease is the last."""

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self.stopped_at: int | None = None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._ctx.stop_event.is_set():
            return
        if self.stopped_at is None:
            self.stopped_at = state.global_step
            logger.info(
                "job %s: stopping at step %d (%s)",
                self._ctx.job_id,
                state.global_step,
                self._ctx.stop_reason,
            )
        lease_lost = self._ctx.lease_lost
        control.should_save = not lease_lost
        control.should_log = control.should_log and not lease_lost
        control.should_training_stop = True
        control.should_evaluate = False

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._stop_if_lease_lost(state, control)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._stop_if_lease_lost(state, control)

    def _stop_if_lease_lost(self, state: TrainerState, control: TrainerControl) -> None:
        """A write refused in this step (the metrics just logged): no save after it."""
        if not self._ctx.lease_lost:
            return
        if self.stopped_at is None:
            self.stopped_at = state.global_step
            logger.info("job %s: lease lost at step %d", self._ctx.job_id, state.global_step)
        control.should_save = False
        control.should_evaluate = False
        control.should_training_stop = True

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.stopped_at is not None:
            control.should_evaluate = False
            control.should_save = False


class AdaLoraCallback(TrainerCallback):
    """AdaLoRA re-allocates ranks from the gradients after each optimizer step, and its
    orthogonality penalty is left out of evaluation losses."""

    def __init__(self) -> None:
        self._penalty: float | None = None

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        kwargs["model"].base_model.update_and_allocate(state.global_step)

    def _before_evaluation(self, control: TrainerControl, model: Any) -> None:
        if control.should_evaluate and self._penalty is None:
            self._penalty = set_orth_reg_weight(model, 0.0)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._before_evaluation(control, kwargs["model"])

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._before_evaluation(control, kwargs["model"])

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._penalty is not None:
            set_orth_reg_weight(kwargs["model"], self._penalty)
            self._penalty = None
