"""Rows in, model-ready features out: schema checks, the validation split, tokenization.

How a row becomes token ids is core.example_tokens' (the API counts a dataset's tokens
with the same rules); here the ids are cut to max_length and given their labels.

Every example becomes a dict of int lists (`input_ids`, `attention_mask`, maybe
`token_type_ids`) plus `labels`: an int for sequence classification, a list with
-100 on the positions that carry no loss otherwise. `PaddingCollator` pads a
batch of them on the right.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from core.enums import (
    LABELLED_SCHEMAS,
    DatasetSchema,
    FailureType,
    FineTuneObjective,
    FineTuneTask,
    training_schemas,
)
from core.errors import PermanentJobError
from core.example_tokens import (
    chat_conversation,
    chat_ids,
    learned_tokens,
    prompt_completion_ids,
    text_ids,
)
from core.specs import FineTuneSpec
from workers.training.io import DatasetRows, TrainingIO

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
EVAL_SLICE_ROWS = 64
Feature = dict[str, Any]


@dataclass(frozen=True)
class SplitRows:
    """Training and validation rows of one schema, and how the validation rows were chosen."""

    schema: DatasetSchema
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    labels: list[str] = field(default_factory=list)  # classes or tags; [] for causal_lm
    validation_source: str = "dataset"  # "dataset", "split" or "train_slice"


def check_schema(dataset: DatasetRows, task: FineTuneTask, objective: FineTuneObjective) -> None:
    allowed = training_schemas(task, objective)
    if dataset.schema not in allowed:
        names = ", ".join(sorted(s.value for s in allowed))
        trains = (
            f"task {task.value!r}"
            if objective is FineTuneObjective.SUPERVISED
            else f"objective {objective.value!r}"
        )
        raise PermanentJobError(
            f"dataset {dataset.id} has schema {dataset.schema.value!r}, which {trains} "
            f"cannot train on (it needs {names})",
            FailureType.INVALID_SPEC,
        )
    if not dataset.rows:
        raise PermanentJobError(f"dataset {dataset.id} has no rows", FailureType.INVALID_SPEC)


def split_rows(
    rows: Sequence[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded shuffle, then the last `fraction` of rows (rounded down) for validation."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_validation = int(len(rows) * fraction)
    cut = len(rows) - n_validation
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def _row_labels(schema: DatasetSchema, rows: Sequence[dict[str, Any]]) -> set[str]:
    if schema in LABELLED_SCHEMAS:
        return {str(row["label"]) for row in rows}
    if schema is DatasetSchema.TOKEN_CLASSIFICATION:
        return {str(tag) for row in rows for tag in row["tags"]}
    return set()


def load_split(io: TrainingIO, spec: FineTuneSpec) -> SplitRows:
    """Training and validation rows for `spec`, with the label set of the training dataset."""
    train_ds = io.dataset(spec.training_dataset)
    check_schema(train_ds, spec.task, spec.objective)
    labels = sorted(_row_labels(train_ds.schema, train_ds.rows))
    seed = spec.hyperparameters.seed
    if spec.validation_dataset is not None:
        val_ds = io.dataset(spec.validation_dataset)
        check_schema(val_ds, spec.task, spec.objective)
        unknown = sorted(_row_labels(val_ds.schema, val_ds.rows) - set(labels))
        if unknown:
            raise PermanentJobError(
                f"validation dataset {val_ds.id} has labels that training dataset "
                f"{train_ds.id} lacks: {', '.join(unknown)}",
                FailureType.INVALID_SPEC,
            )
        return SplitRows(train_ds.schema, list(train_ds.rows), list(val_ds.rows), labels)
    train, validation = split_rows(train_ds.rows, spec.validation_split, seed)
    if validation:
        return SplitRows(train_ds.schema, train, validation, labels, "split")
    io.event(
        f"validation split of {spec.validation_split} leaves no rows out of {len(train)}; "
        f"evaluating on the first {min(len(train), EVAL_SLICE_ROWS)} training rows",
        {"validation_split": spec.validation_split, "train_rows": len(train)},
    )
    return SplitRows(train_ds.schema, train, train[:EVAL_SLICE_ROWS], labels, "train_slice")


class FeatureDataset(torch.utils.data.Dataset[Feature]):
    def __init__(self, features: list[Feature]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Feature:
        return self.features[index]


class PaddingCollator:
    """Right-pads a batch: `pad_id` for input ids, 0 for masks, -100 for per-token labels."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[Feature]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if not isinstance(values[0], list):
                batch[key] = torch.tensor(values, dtype=torch.long)
                continue
            fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = torch.tensor(
                [v + [fill] * (width - len(v)) for v in values], dtype=torch.long
            )
        return batch


def pad_token_id(tokenizer: Any) -> int:
    """Gives the tokenizer a pad token (its eos) when it has none; 0 when it has neither."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def _lm_feature(ids: list[int], labels: list[int]) -> Feature:
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_text(tokenizer: Any, text: str, max_length: int) -> Feature:
    ids = text_ids(tokenizer, text)[:max_length]
    return _lm_feature(ids, list(ids))


def encode_prompt_completion(
    tokenizer: Any, prompt: str, completion: str, max_length: int, train_on_inputs: bool = False
) -> Feature:
    """Loss on the completion (and eos) only, unless `train_on_inputs`. Too long: the prompt
    loses its start first, but the completion keeps at least half of `max_length`."""
    prompt_ids, completion_ids = prompt_completion_ids(tokenizer, prompt, completion)
    keep_completion = min(len(completion_ids), max(max_length - len(prompt_ids), max_length // 2))
    keep_prompt = min(len(prompt_ids), max_length - keep_completion)
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
    completion_ids = completion_ids[:keep_completion]
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return _lm_feature(prompt_ids + completion_ids, prompt_labels + completion_ids)


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    max_length: int,
    train_on_inputs: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> Feature:
    """Loss on the assistant's messages only (each with its end-of-turn marker; none on one
    with `weight` 0), as OpenAI's fine-tuning trains chat rows. Where the tokens cannot be
    placed in the messages (a slow tokenizer without offsets, a template that renders
    earlier turns differently once later ones follow), and with `train_on_inputs`, on the
    whole conversation."""
    conversation, shown = chat_conversation(tokenizer, messages, tools)
    ids = chat_ids(tokenizer, conversation, shown)
    if train_on_inputs:
        return _lm_feature(ids[:max_length], ids[:max_length])
    mask = learned_tokens(tokenizer, conversation, ids, shown)
    if mask is None:
        _warn_whole_conversation(tokenizer)
        labels = list(ids)
    else:
        labels = [i if learn else IGNORE_INDEX for i, learn in zip(ids, mask, strict=True)]
    return _lm_feature(ids[:max_length], labels[:max_length])


_whole_warned: set[str] = set()


def _warn_whole_conversation(tokenizer: Any) -> None:
    name = str(getattr(tokenizer, "name_or_path", "")) or type(tokenizer).__name__
    if name not in _whole_warned:
        _whole_warned.add(name)
        logger.warning(
            "the chat rows' assistant messages cannot be placed in %s's encoding; "
            "training learns their whole conversations",
            name,
        )


def encode_classification(
    tokenizer: Any, text: str, label: int, max_length: int, text_pair: str | None = None
) -> Feature:
    """One text, or a (text, text_pair) pair encoded the tokenizer's pair way (BERT:
    [CLS] a [SEP] b [SEP] with segment ids); a long pair loses from its longer side."""
    enc = tokenizer(text, text_pair, truncation=True, max_length=max_length)
    feature: Feature = {k: list(v) for k, v in enc.items()}
    feature["labels"] = label
    return feature


def encode_tagged(
    tokenizer: Any, tokens: list[str], tag_ids: list[int], max_length: int
) -> Feature:
    """Word tags onto sub-tokens: a word's first sub-token carries its tag, the rest -100."""
    enc = tokenizer(tokens, is_split_into_words=True, truncation=True, max_length=max_length)
    labels: list[int] = []
    previous: int | None = None
    for word in enc.word_ids():
        labels.append(IGNORE_INDEX if word is None or word == previous else tag_ids[word])
        previous = word
    feature: Feature = {k: list(v) for k, v in enc.items()}
    feature["labels"] = labels
    return feature


def encode_rows(
    tokenizer: Any,
    schema: DatasetSchema,
    rows: Sequence[dict[str, Any]],
    labels: Sequence[str],
    max_length: int,
    train_on_inputs: bool = False,
) -> list[Feature]:
    """Features for `rows`; language-model rows left with no loss token are dropped.
    `train_on_inputs`: chat and prompt/completion rows learn their inputs too."""
    label_ids = {name: i for i, name in enumerate(labels)}
    if schema is DatasetSchema.TOKEN_CLASSIFICATION and not getattr(tokenizer, "is_fast", False):
        raise PermanentJobError(
            "token classification needs a fast tokenizer (to map words to sub-tokens)",
            FailureType.INVALID_SPEC,
        )
    features: list[Feature] = []
    for index, row in enumerate(rows):
        if schema is DatasetSchema.TEXT:
            feature = encode_text(tokenizer, row["text"], max_length)
        elif schema is DatasetSchema.PROMPT_COMPLETION:
            feature = encode_prompt_completion(
                tokenizer, row["prompt"], row["completion"], max_length, train_on_inputs
            )
        elif schema is DatasetSchema.CHAT:
            feature = encode_chat(
                tokenizer, row["messages"], max_length, train_on_inputs, row.get("tools")
            )
        elif schema in LABELLED_SCHEMAS:
            feature = encode_classification(
                tokenizer,
                row["text"],
                label_ids[str(row["label"])],
                max_length,
                row.get("text_pair"),
            )
        else:
            tokens, tags = list(row["tokens"]), [str(t) for t in row["tags"]]
            if len(tokens) != len(tags):
                raise PermanentJobError(
                    f"row {index} has {len(tokens)} tokens but {len(tags)} tags",
                    FailureType.INVALID_SPEC,
                )
            feature = encode_tagged(tokenizer, tokens, [label_ids[t] for t in tags], max_length)
        if isinstance(feature["labels"], int) or any(
            label != IGNORE_INDEX for label in feature["labels"]
        ):
            features.append(feature)
    if len(features) < len(rows):
        logger.warning(
            "%d of %d rows had no token to learn from", len(rows) - len(features), len(rows)
        )
    return features
