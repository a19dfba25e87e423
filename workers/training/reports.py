"""Evaluation reports: perplexity, classification (scikit-learn) and NER (seqeval).

Reports follow the table shape of scikit-learn's and seqeval's
`classification_report(..., output_dict=True)`: one row per label or entity type
(`precision`, `recall`, `f1-score`, `support`), average rows (`macro avg`,
`weighted avg`, and `micro avg` for NER) and a scalar `accuracy`, converted to
plain floats and ints so they store as JSON. The `compute_metrics` factories give
transformers' Trainer the flat float metrics it logs; the `*_from_predictions`
helpers turn the same predictions into the full reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from seqeval.metrics import accuracy_score as seq_accuracy
from seqeval.metrics import classification_report as seq_report
from seqeval.metrics import f1_score as seq_f1
from seqeval.metrics import precision_score as seq_precision
from seqeval.metrics import recall_score as seq_recall
from seqeval.metrics.sequence_labeling import get_entities
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
)

from core.enums import FineTuneTask

IGNORE_INDEX = -100  # label id the collators put on padding and non-first sub-tokens
AVERAGE_ROWS = ("micro avg", "macro avg", "weighted avg")
METRIC_COLUMNS = ("precision", "recall", "f1-score")
RESERVED_KEYS = frozenset({*AVERAGE_ROWS, "accuracy", "labels", "confusion_matrix"})


class Predictions(Protocol):
    """What transformers' EvalPrediction and PredictionOutput both carry."""

    @property
    def predictions(self) -> Any: ...

    @property
    def label_ids(self) -> Any: ...


Row = dict[str, float | int]
ComputeMetrics = Callable[[Predictions], dict[str, float]]


def perplexity(eval_loss: float) -> float:
    """exp(loss); `inf` where that overflows (or the loss is inf), NaN for a NaN loss."""
    if math.isnan(eval_loss):
        return math.nan
    try:
        return math.exp(eval_loss)
    except OverflowError:
        return math.inf


def _row(precision: Any, recall: Any, f1: Any, support: Any) -> Row:
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1-score": float(f1),
        "support": int(support),
    }


def _check_names(names: Sequence[str], what: str) -> None:
    clashes = sorted(set(names) & RESERVED_KEYS)
    if clashes:
        raise ValueError(f"{what} {clashes} clash with report keys; rename them")


def classification_report(
    y_true: list[int], y_pred: list[int], label_names: list[str]
) -> dict[str, Any]:
    """Accuracy, per-label and macro/weighted P/R/F1, and the confusion matrix.

    Every label in `label_names` gets a row (support 0 when absent), and the
    averages run over all of them, as scikit-learn does when given the labels.
    `confusion_matrix[i][j]` counts examples of `labels[i]` predicted as `labels[j]`.
    Undefined precision or recall (nothing predicted, nothing to find) counts as 0.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("no examples to report on")
    if len(set(label_names)) != len(label_names):
        raise ValueError("label names must be unique")
    _check_names(label_names, "label names")
    ids = list(range(len(label_names)))
    out_of_range = sorted({y for y in (*y_true, *y_pred) if not 0 <= y < len(label_names)})
    if out_of_range:
        raise ValueError(f"label ids {out_of_range} are outside 0..{len(label_names) - 1}")

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, average=None, zero_division=0
    )
    report: dict[str, Any] = {
        name: _row(precision[i], recall[i], f1[i], support[i]) for i, name in enumerate(label_names)
    }
    report["accuracy"] = float(accuracy_score(y_true, y_pred))
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=ids, average=average, zero_division=0
        )
        report[f"{average} avg"] = _row(p, r, f, len(y_true))
    matrix = confusion_matrix(y_true, y_pred, labels=ids)
    report["labels"] = list(label_names)
    report["confusion_matrix"] = [[int(n) for n in row] for row in matrix]
    return report


def _check_sequences(true_tags: list[list[str]], pred_tags: list[list[str]]) -> None:
    if len(true_tags) != len(pred_tags):
        raise ValueError(f"{len(true_tags)} true sequences but {len(pred_tags)} predicted")
    if not true_tags:
        raise ValueError("no sequences to report on")
    for i, (t, p) in enumerate(zip(true_tags, pred_tags, strict=True)):
        if len(t) != len(p):
            raise ValueError(f"sequence {i}: {len(t)} true tags but {len(p)} predicted")


def ner_report(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, Any]:
    """Entity-level P/R/F1/support per entity type with micro, macro and weighted
    averages (seqeval, conlleval matching), plus token-level `accuracy`.

    With no entity in either the truth or the predictions only the average rows
    remain, all zero.
    """
    _check_sequences(true_tags, pred_tags)
    types = sorted({kind for kind, _, _ in get_entities(true_tags) + get_entities(pred_tags)})
    _check_names(types, "entity types")
    report: dict[str, Any]
    if types:
        raw = seq_report(true_tags, pred_tags, output_dict=True, zero_division=0)
        report = {
            name: _row(row["precision"], row["recall"], row["f1-score"], row["support"])
            for name, row in raw.items()
        }
    else:
        report = {name: _row(0, 0, 0, 0) for name in AVERAGE_ROWS}
    report["accuracy"] = float(seq_accuracy(true_tags, pred_tags))
    return report


def format_report_table(report: dict[str, Any], digits: int = 2) -> str:
    """The report as the fixed-width table scikit-learn and seqeval print.

    Label rows come first in the report's order, then accuracy and the averages;
    a confusion matrix, if present, follows the table.
    """
    rows = [
        (name, value)
        for name, value in report.items()
        if isinstance(value, dict) and name not in AVERAGE_ROWS
    ]
    averages = [(name, report[name]) for name in AVERAGE_ROWS if name in report]
    names = [name for name, _ in rows + averages]
    width = max([len(name) for name in names] + [len("weighted avg"), digits])
    headers = (*METRIC_COLUMNS, "support")
    lines = [" " * width + " " + "".join(f"{h:>10}" for h in headers), ""]

    def line(name: str, row: dict[str, Any]) -> str:
        cells = "".join(f"{float(row[c]):>10.{digits}f}" for c in METRIC_COLUMNS)
        return f"{name:>{width}} {cells}{int(row['support']):>10}"

    if rows:
        lines.extend(line(name, row) for name, row in rows)
        lines.append("")
    if "accuracy" in report:
        accuracy = f"{'accuracy':>{width}} {float(report['accuracy']):>30.{digits}f}"
        if "micro avg" not in report and averages:
            # classification accuracy is over the same examples as the averages;
            # NER accuracy is over tokens, not the entities the support counts
            accuracy += f"{int(averages[0][1]['support']):>10}"
        lines.append(accuracy)
    lines.extend(line(name, row) for name, row in averages)
    matrix = report.get("confusion_matrix")
    labels = report.get("labels")
    if matrix and labels:
        lines.extend(["", "confusion matrix (rows: true, columns: predicted)"])
        cell = max([len(str(label)) for label in labels] + [len(str(n)) for r in matrix for n in r])
        label_width = max(len(str(label)) for label in labels)
        lines.append(" " * label_width + "".join(f" {label:>{cell}}" for label in labels))
        for label, counts in zip(labels, matrix, strict=True):
            lines.append(f"{label:>{label_width}}" + "".join(f" {n:>{cell}}" for n in counts))
    return "\n".join(lines) + "\n"


def _logits(predictions: Any) -> np.ndarray[Any, Any]:
    """The model's logits; a model returning several outputs gives a tuple, logits first."""
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    return np.asarray(predictions)


def _predicted_ids(predictions: Any, label_ids: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Arg-max over the last axis of logits; ids as they are if already reduced."""
    values = _logits(predictions)
    if values.ndim == label_ids.ndim + 1:
        return np.asarray(values.argmax(axis=-1))
    if values.ndim == label_ids.ndim:
        return values.astype(np.int64)
    raise ValueError(f"predictions of shape {values.shape} do not fit labels {label_ids.shape}")


def classification_ids(prediction: Predictions) -> tuple[list[int], list[int]]:
    """(true, predicted) label ids of a sequence-classification evaluation."""
    labels = np.asarray(prediction.label_ids).reshape(-1)
    predicted = _predicted_ids(prediction.predictions, labels).reshape(-1)
    return [int(y) for y in labels], [int(y) for y in predicted]


def tag_sequences(
    prediction: Predictions, label_names: list[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """(true, predicted) tag sequences, keeping only positions whose label isn't -100."""
    labels = np.asarray(prediction.label_ids)
    predicted = _predicted_ids(prediction.predictions, labels)
    true_tags: list[list[str]] = []
    pred_tags: list[list[str]] = []
    for label_row, pred_row in zip(labels, predicted, strict=True):
        keep = label_row != IGNORE_INDEX
        true_tags.append([label_names[int(i)] for i in label_row[keep]])
        pred_tags.append([label_names[int(i)] for i in pred_row[keep]])
    return true_tags, pred_tags


def classification_compute_metrics(label_names: list[str]) -> ComputeMetrics:
    """Trainer `compute_metrics`: accuracy and macro/weighted averages over all labels."""
    ids = list(range(len(label_names)))

    def compute(prediction: Predictions) -> dict[str, float]:
        y_true, y_pred = classification_ids(prediction)
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=ids, average="macro", zero_division=0
        )
        _, _, fw, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=ids, average="weighted", zero_division=0
        )
        return {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "f1_macro": float(f),
            "f1_weighted": float(fw),
            "precision_macro": float(p),
            "recall_macro": float(r),
        }

    return compute


def ner_compute_metrics(label_names: list[str]) -> ComputeMetrics:
    """Trainer `compute_metrics`: entity-level micro precision/recall/F1 and token accuracy."""

    def compute(prediction: Predictions) -> dict[str, float]:
        true_tags, pred_tags = tag_sequences(prediction, label_names)
        return {
            "precision": float(seq_precision(true_tags, pred_tags, zero_division=0)),
            "recall": float(seq_recall(true_tags, pred_tags, zero_division=0)),
            "f1": float(seq_f1(true_tags, pred_tags, zero_division=0)),
            "accuracy": float(seq_accuracy(true_tags, pred_tags)),
        }

    return compute


def classification_report_from_predictions(
    prediction: Predictions, label_names: list[str]
) -> dict[str, Any]:
    y_true, y_pred = classification_ids(prediction)
    return classification_report(y_true, y_pred, label_names)


def ner_report_from_predictions(prediction: Predictions, label_names: list[str]) -> dict[str, Any]:
    true_tags, pred_tags = tag_sequences(prediction, label_names)
    return ner_report(true_tags, pred_tags)


def compute_metrics_for(task: FineTuneTask, label_names: list[str]) -> ComputeMetrics | None:
    """The Trainer `compute_metrics` for a task; None for causal LM (loss/perplexity only)."""
    if task is FineTuneTask.SEQUENCE_CLASSIFICATION:
        return classification_compute_metrics(label_names)
    if task is FineTuneTask.TOKEN_CLASSIFICATION:
        return ner_compute_metrics(label_names)
    return None


def full_report_from_predictions(
    task: FineTuneTask, prediction: Predictions, label_names: list[str]
) -> dict[str, Any]:
    """The full report of a classification or tagging evaluation (Trainer.predict output)."""
    if task is FineTuneTask.SEQUENCE_CLASSIFICATION:
        return classification_report_from_predictions(prediction, label_names)
    if task is FineTuneTask.TOKEN_CLASSIFICATION:
        return ner_report_from_predictions(prediction, label_names)
    raise ValueError(f"no prediction report for task {task}; use perplexity(eval_loss)")
