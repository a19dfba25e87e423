"""Evaluation reports against figures worked out by hand."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from seqeval.metrics import classification_report as seqeval_text_report
from sklearn.metrics import classification_report as sklearn_text_report
from transformers import EvalPrediction

from core.enums import FineTuneTask
from workers.training.reports import (
    classification_compute_metrics,
    classification_report,
    compute_metrics_for,
    format_report_table,
    full_report_from_predictions,
    ner_compute_metrics,
    ner_report,
    perplexity,
)

LABELS = ["cat", "dog", "bird"]
# true cat x3, dog x2, bird x4; rows of the confusion matrix below
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2]
Y_PRED = [0, 0, 1, 1, 1, 2, 2, 0, 1]
MATRIX = [[2, 1, 0], [0, 2, 0], [1, 1, 2]]

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
NER_TRUE = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER", "O"]]
NER_PRED = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O", "B-PER", "I-PER"]]


def one_hot_logits(ids: list[int] | list[list[int]], n: int) -> np.ndarray[Any, Any]:
    return np.eye(n, dtype=np.float32)[np.asarray(ids)] * 4.0 - 2.0


def assert_plain_json(value: Any) -> None:
    """Only plain Python types, no numpy scalars, and it survives a JSON round trip."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str
            assert_plain_json(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain_json(item)
    else:
        assert type(value) in (str, int, float), type(value)
    assert json.loads(json.dumps(value)) == value


def test_perplexity_is_exp_and_inf_safe() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(5.0)) == pytest.approx(5.0)
    assert perplexity(1e6) == math.inf
    assert perplexity(math.inf) == math.inf
    assert math.isnan(perplexity(math.nan))


def test_classification_report_by_hand() -> None:
    report = classification_report(Y_TRUE, Y_PRED, LABELS)
    assert report["labels"] == LABELS
    assert report["confusion_matrix"] == MATRIX
    assert report["accuracy"] == pytest.approx(6 / 9)
    # columns of the matrix give precision, rows give recall
    assert report["cat"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1-score": 2 / 3, "support": 3}
    )
    assert report["dog"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1.0, "f1-score": 2 / 3, "support": 2}
    )
    assert report["bird"] == pytest.approx(
        {"precision": 1.0, "recall": 1 / 2, "f1-score": 2 / 3, "support": 4}
    )
    assert report["macro avg"] == pytest.approx(
        {"precision": 13 / 18, "recall": 13 / 18, "f1-score": 2 / 3, "support": 9}
    )
    assert report["weighted avg"] == pytest.approx(
        {"precision": 7 / 9, "recall": 6 / 9, "f1-score": 2 / 3, "support": 9}
    )
    assert_plain_json(report)


def test_classification_report_keeps_absent_labels_without_warnings() -> None:
    # "fish" is never true nor predicted: zeros, no UndefinedMetricWarning (warnings are errors)
    report = classification_report([0, 1], [0, 0], ["cat", "dog", "fish"])
    assert report["fish"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    assert report["dog"]["precision"] == 0.0
    assert report["macro avg"]["precision"] == pytest.approx((1 / 2 + 0 + 0) / 3)
    assert report["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize(
    ("y_true", "y_pred", "labels", "message"),
    [
        ([0, 1], [0], ["a", "b"], "2 true labels but 1 predictions"),
        ([], [], ["a", "b"], "no examples"),
        ([0, 2], [0, 1], ["a", "b"], r"label ids \[2\] are outside"),
        ([0], [0], ["a", "a"], "unique"),
        ([0], [0], ["a", "accuracy"], "clash"),
    ],
)
def test_classification_report_rejects_bad_input(
    y_true: list[int], y_pred: list[int], labels: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        classification_report(y_true, y_pred, labels)


def test_ner_report_by_hand() -> None:
    report = ner_report(NER_TRUE, NER_PRED)
    # true: PER x2, LOC, ORG; predicted: PER (right), PER (wrong span), ORG (right)
    assert list(report) == [
        "LOC",
        "ORG",
        "PER",
        "micro avg",
        "macro avg",
        "weighted avg",
        "accuracy",
    ]
    assert report["PER"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 2, "f1-score": 1 / 2, "support": 2}
    )
    assert report["LOC"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 1}
    assert report["ORG"] == {"precision": 1.0, "recall": 1.0, "f1-score": 1.0, "support": 1}
    assert report["micro avg"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1 / 2, "f1-score": 4 / 7, "support": 4}
    )
    assert report["macro avg"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 2, "f1-score": 1 / 2, "support": 4}
    )
    assert report["weighted avg"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 2, "f1-score": 1 / 2, "support": 4}
    )
    assert report["accuracy"] == pytest.approx(6 / 8)
    assert_plain_json(report)


def test_ner_report_without_any_entity() -> None:
    report = ner_report([["O", "O"]], [["O", "O"]])
    assert report["accuracy"] == 1.0
    assert report["micro avg"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    assert set(report) == {"micro avg", "macro avg", "weighted avg", "accuracy"}


def test_ner_report_rejects_misaligned_sequences() -> None:
    with pytest.raises(ValueError, match="sequence 1: 4 true tags but 3 predicted"):
        ner_report(NER_TRUE, [NER_PRED[0], NER_PRED[1][:3]])
    with pytest.raises(ValueError, match="2 true sequences but 1 predicted"):
        ner_report(NER_TRUE, NER_PRED[:1])


def table_lines(text: str) -> set[str]:
    return {line.rstrip() for line in text.splitlines() if line.strip()}


def test_tables_print_like_sklearn_and_seqeval() -> None:
    ours = format_report_table(classification_report(Y_TRUE, Y_PRED, LABELS))
    theirs = sklearn_text_report(Y_TRUE, Y_PRED, labels=[0, 1, 2], target_names=LABELS)
    assert table_lines(theirs) <= table_lines(ours)
    assert "confusion matrix (rows: true, columns: predicted)" in ours
    assert "bird    1    1    2" in ours.splitlines()

    ours = format_report_table(ner_report(NER_TRUE, NER_PRED))
    theirs = seqeval_text_report(NER_TRUE, NER_PRED, zero_division=0)
    assert table_lines(theirs) <= table_lines(ours)
    assert "    accuracy                           0.75" in ours.splitlines()


def test_classification_compute_metrics_from_logits() -> None:
    compute = classification_compute_metrics(LABELS)
    prediction = EvalPrediction(predictions=one_hot_logits(Y_PRED, 3), label_ids=np.asarray(Y_TRUE))
    metrics = compute(prediction)
    assert metrics == pytest.approx(
        {
            "accuracy": 6 / 9,
            "f1_macro": 2 / 3,
            "f1_weighted": 2 / 3,
            "precision_macro": 13 / 18,
            "recall_macro": 13 / 18,
        }
    )
    assert all(type(v) is float for v in metrics.values())
    # a model returning several outputs gives a tuple with the logits first
    extra = np.zeros((len(Y_PRED), 7), dtype=np.float32)
    assert (
        compute(
            EvalPrediction(
                predictions=(one_hot_logits(Y_PRED, 3), extra), label_ids=np.asarray(Y_TRUE)
            )
        )
        == metrics
    )
    # predictions already reduced to ids (preprocess_logits_for_metrics)
    assert (
        compute(EvalPrediction(predictions=np.asarray(Y_PRED), label_ids=np.asarray(Y_TRUE)))
        == metrics
    )
    report = full_report_from_predictions(FineTuneTask.SEQUENCE_CLASSIFICATION, prediction, LABELS)
    assert report == classification_report(Y_TRUE, Y_PRED, LABELS)


def test_ner_compute_metrics_ignores_minus_100() -> None:
    ner_tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    # -100 on [CLS]/[SEP], non-first sub-tokens and padding; the model's guesses
    # there would add a LOC and a PER entity if they were counted
    label_ids = np.asarray([[-100, 1, 2, 0, 3, -100], [-100, 3, -100, 0, -100, -100]])
    predicted = [[3, 1, 2, 0, 0, 3], [1, 3, 4, 0, 1, 1]]
    prediction = EvalPrediction(predictions=one_hot_logits(predicted, 5), label_ids=label_ids)
    metrics = ner_compute_metrics(ner_tags)(prediction)
    # true: PER, LOC | LOC; predicted: PER | LOC
    assert metrics == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "accuracy": 5 / 6}
    )
    report = full_report_from_predictions(FineTuneTask.TOKEN_CLASSIFICATION, prediction, ner_tags)
    assert report == ner_report(
        [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]],
        [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O"]],
    )
    assert report["LOC"]["support"] == 2


def test_compute_metrics_per_task() -> None:
    assert compute_metrics_for(FineTuneTask.CAUSAL_LM, []) is None
    assert compute_metrics_for(FineTuneTask.SEQUENCE_CLASSIFICATION, LABELS) is not None
    assert compute_metrics_for(FineTuneTask.TOKEN_CLASSIFICATION, TAGS) is not None
    with pytest.raises(ValueError, match="perplexity"):
        full_report_from_predictions(
            FineTuneTask.CAUSAL_LM,
            EvalPrediction(predictions=np.zeros((1, 2)), label_ids=np.zeros(1)),
            [],
        )
