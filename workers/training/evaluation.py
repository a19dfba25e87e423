"""Evaluations: perplexity (and, when asked, exact match of generated completions) beside a
causal LM's loss at every one, and the final one (the task's report from reports.py, or
TRL's figures for DPO and reinforcement, and its flat figures)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from core.enums import FineTuneTask
from workers.training.callbacks import eval_figures
from workers.training.checkpoints import AtomicCheckpointTrainer
from workers.training.data import FeatureDataset
from workers.training.exact_match import ExactMatchSet, count_matches
from workers.training.peft_setup import without_orth_regularization
from workers.training.reports import (
    AVERAGE_ROWS,
    full_report_from_predictions,
    perplexity,
)

FLAT_COLUMNS = {"precision": "precision", "recall": "recall", "f1-score": "f1"}


def argmax_logits(logits: Any, labels: Any) -> torch.Tensor:
    """Keeps predicted ids instead of logits across evaluation batches (token
    classification logits are batch x tokens x labels)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    ids: torch.Tensor = logits.argmax(dim=-1)
    return ids


class FineTuneTrainer(AtomicCheckpointTrainer):
    """The Trainer of a fine-tune: atomic checkpoints, and with `with_perplexity` (causal
    LM) `<prefix>_perplexity` = exp(loss) in every evaluation's metrics, with `exact_match`
    `<prefix>_exact_match` too; logged and stored with them and selectable as
    `metric_for_best_model`."""

    def __init__(
        self,
        *args: Any,
        with_perplexity: bool = False,
        exact_match: ExactMatchSet | None = None,
        pad_id: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._with_perplexity = with_perplexity
        self._exact_match = exact_match
        self._pad_id = pad_id

    def evaluation_loop(
        self,
        dataloader: DataLoader[Any],
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        loss = (output.metrics or {}).get(f"{metric_key_prefix}_loss")
        if self._with_perplexity and output.metrics is not None and loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(float(loss))
        if self._exact_match is not None and output.metrics is not None:
            output.metrics[f"{metric_key_prefix}_exact_match"] = self._exact_match_share()
        return output

    def _exact_match_share(self) -> float:
        """This process scores every world_size-th row; the counts are summed over all."""
        scored = self._exact_match
        assert scored is not None and self.model is not None
        mine = list(range(self.args.process_index, len(scored), self.args.world_size))
        matches = count_matches(
            self.model,
            self.processing_class,
            scored,
            mine,
            self.args.per_device_eval_batch_size,
            self._pad_id,
        )
        total = torch.tensor(float(matches), device=self.args.device)
        if self.args.world_size > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return float(total.item()) / len(scored)


def final_report(
    trainer: Trainer,
    model: torch.nn.Module,
    task: FineTuneTask,
    validation: FeatureDataset,
    labels: list[str],
) -> tuple[dict[str, Any], float]:
    """The report stored on the job, and the validation loss (`model` is the trainer's)."""
    with without_orth_regularization(model):
        if task is FineTuneTask.CAUSAL_LM:
            metrics = trainer.evaluate(validation)
            loss = float(metrics["eval_loss"])
            report = {"eval_loss": loss, "perplexity": perplexity(loss)}
            if "eval_exact_match" in metrics:
                report["exact_match"] = float(metrics["eval_exact_match"])
            return report, loss
        prediction = trainer.predict(validation, metric_key_prefix="eval")
    loss = float((prediction.metrics or {}).get("eval_loss", float("nan")))
    return full_report_from_predictions(task, prediction, labels), loss


def trl_report(trainer: Trainer, model: torch.nn.Module) -> tuple[dict[str, Any], float]:
    """The final report of a TRL objective (DPO, reinforcement): the validation loss and
    TRL's figures of the validation set (DPO's `rewards/accuracies`, `rewards/margins`;
    the grader's `reward`, `rewards/grader/mean`; ...), without the `eval_` prefix; not its
    `num_tokens`, a count of the training tokens."""
    with without_orth_regularization(model):
        metrics = trainer.evaluate()
    loss = float(metrics.get("eval_loss", math.nan))
    report: dict[str, Any] = {"eval_loss": loss}
    for name, value in eval_figures(metrics).items():
        if name not in ("eval_loss", "eval_num_tokens"):
            report[name.removeprefix("eval_")] = value
    return report, loss


def flat_figures(report: dict[str, Any], eval_loss: float) -> dict[str, float]:
    """Scalars of the report plus the average rows as `f1_macro`, `precision_micro`, ..."""
    figures = {"eval_loss": eval_loss}
    for name, value in report.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            figures[name] = float(value)
    for row_name in AVERAGE_ROWS:
        row = report.get(row_name)
        if not isinstance(row, dict):
            continue
        kind = row_name.split()[0]
        for column, short in FLAT_COLUMNS.items():
            if column in row:
                figures[f"{short}_{kind}"] = float(row[column])
    return figures
