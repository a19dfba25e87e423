"""Pure parts of the applications: pair rows, the rank label, sorting by score, the
past Q&A that retrieval reads, and pair encoding for training."""

from __future__ import annotations

import json

import pytest

from core.datasets import parse_dataset
from core.enums import DatasetSchema
from core.errors import DatasetFormatError
from core.ranking import rank_label
from core.specs import GenerateSpec, PredictSpec
from workers.generation.retrieval import Hit, PastAnswer, context_message, past_answers
from workers.training.rank import rank


def test_pair_rows_are_normalized() -> None:
    raw = json.dumps({"text": "likes tents", "text_pair": "a tent", "label": 1, "id": 7})
    parsed = parse_dataset(raw.encode(), "pairs.jsonl")
    assert parsed.schema is DatasetSchema.PAIR_CLASSIFICATION
    assert parsed.rows == [{"text": "likes tents", "text_pair": "a tent", "label": "1"}]
    assert parsed.labels == ["1"]


def test_pair_row_with_an_empty_item_is_refused() -> None:
    raw = json.dumps({"text": "likes tents", "text_pair": " ", "label": "clicked"})
    with pytest.raises(DatasetFormatError, match="'text_pair' is empty"):
        parse_dataset(raw.encode(), "pairs.jsonl")


def test_rank_label() -> None:
    assert rank_label(["clicked", "skipped"], None) == "clicked"
    assert rank_label(["0", "1"], None) == "1"
    assert rank_label(["a", "b"], "a") == "a"
    with pytest.raises(ValueError, match="name the positive one"):
        rank_label(["a", "b"], None)
    with pytest.raises(ValueError, match="not one of the model's labels"):
        rank_label(["clicked", "skipped"], "bought")


def test_rank_sorts_by_score_and_keeps_request_order_on_ties() -> None:
    ranked = rank([0.2, 0.9, 0.2, 0.5], ["a", "b", "c", "d"], None)
    assert [(r.index, r.text) for r in ranked] == [(1, "b"), (3, "d"), (0, "a"), (2, "c")]
    assert [r.text for r in rank([0.2, 0.9, 0.5], ["a", "b", "c"], 2)] == ["b", "c"]


def test_rank_spec_needs_query_and_candidates() -> None:
    with pytest.raises(ValueError, match="needs a query"):
        PredictSpec.model_validate({"model": "m", "mode": "rank", "query": "q"})
    spec = PredictSpec.model_validate(
        {"model": "m", "mode": "rank", "query": "q", "candidates": ["a"]}
    )
    assert spec.candidates == ["a"]


def test_retrieval_needs_the_chat_template() -> None:
    retrieval = {"dataset": "ds_" + "0" * 32, "embedding_model": "enc"}
    with pytest.raises(ValueError, match="retrieval needs messages or chat=true"):
        GenerateSpec.model_validate({"model": "m", "prompts": ["q"], "retrieval": retrieval})
    spec = GenerateSpec.model_validate(
        {"model": "m", "prompts": ["q"], "chat": True, "retrieval": retrieval}
    )
    assert spec.retrieval is not None and spec.retrieval.k == 3


def test_past_answers_pair_each_assistant_message_with_the_question_before() -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Where is it?"},
                {"role": "assistant", "content": "On its way."},
                {"role": "user", "content": "When?"},
                {"role": "assistant", "content": "Tomorrow."},
                {"role": "assistant", "content": "Anything else?"},
            ]
        }
    ]
    assert past_answers(DatasetSchema.CHAT, rows) == [
        PastAnswer(0, "Where is it?", "On its way."),
        PastAnswer(0, "When?", "Tomorrow."),
    ]
    completion = [{"prompt": "Q", "completion": "A"}] * 2 + [{"prompt": "Q", "completion": "B"}]
    assert past_answers(DatasetSchema.PROMPT_COMPLETION, completion) == [
        PastAnswer(0, "Q", "A"),
        PastAnswer(2, "Q", "B"),
    ]


def test_context_message_lists_the_hits_best_first() -> None:
    hits = [Hit(PastAnswer(3, "Q1", "A1"), 0.9), Hit(PastAnswer(1, "Q2", "A2"), 0.5)]
    text = context_message(hits)
    assert text.index("Q: Q1\nA: A1") < text.index("Q: Q2\nA: A2")


def test_pairs_are_encoded_as_pairs() -> None:
    from tests.support.tiny_encoder import build_tiny_tokenizer
    from workers.training.data import encode_rows

    tokenizer = build_tiny_tokenizer()
    rows = [{"text": "the war", "text_pair": "the navy", "label": "clicked"}]
    (feature,) = encode_rows(
        tokenizer, DatasetSchema.PAIR_CLASSIFICATION, rows, ["clicked", "skipped"], 32
    )
    assert feature["labels"] == 0
    assert tokenizer.decode(feature["input_ids"]) == "[CLS] the war [SEP] the navy [SEP]"
