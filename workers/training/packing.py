"""Sequence packing for causal-LM fine-tunes: several short examples share each training
sequence of up to `max_length` tokens, and no example attends to another.

transformers keeps packed examples apart through their position ids: given no attention
mask and no cache, `create_causal_mask` reads each restart of the position ids at 0 as the
start of another example and builds a block-diagonal causal mask (sdpa, eager, flex), and
flash-attention reads the same restarts as sequence boundaries. Two things break that
silently: a cache (GPT-2 and Llama make one whenever `use_cache` is on, which their configs
default to, in training too), so packed batches turn it off; and model types that build
their mask or positions another way (BLOOM's ALiBi from the attention mask), so the model
is probed before it trains (`require_isolation`). Each example's first label is -100: it is
not learned from the previous example's last token.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from core.enums import FailureType
from core.errors import PermanentJobError
from workers.training.data import IGNORE_INDEX, Feature, FeatureDataset, PaddingCollator

logger = logging.getLogger(__name__)

PROBE_LENGTHS = (6, 9)
PROBE_TOLERANCE = 1e-5  # of the largest logit; fp32 isolation differs by about 1e-7


class PackedDataset(FeatureDataset):
    """Packed training sequences, and how many examples they hold."""

    def __init__(self, sequences: list[Feature], examples: int, max_length: int) -> None:
        super().__init__(sequences)
        self.examples = examples
        self.max_length = max_length

    @property
    def tokens(self) -> int:
        return sum(len(sequence["input_ids"]) for sequence in self.features)

    @property
    def fill(self) -> float:
        """The share of the sequences' `max_length` slots that hold a token."""
        return self.tokens / max(len(self.features) * self.max_length, 1)


def pack_features(features: Sequence[Feature], max_length: int) -> PackedDataset:
    """Best-fit decreasing: the longest example first (ties in dataset order), each into the
    sequence whose free room fits it most tightly, a new sequence when none does. The
    result depends on the features alone, so an attempt that resumes packs the same
    sequences and the Trainer's seeded sampler walks them in the same order."""
    order = sorted(range(len(features)), key=lambda i: (-len(features[i]["input_ids"]), i))
    members: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, sequence index), ascending
    for index in order:
        length = len(features[index]["input_ids"])
        if length > max_length:
            raise ValueError(f"an example of {length} tokens is longer than {max_length}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            members.append([index])
            room, sequence = max_length - length, len(members) - 1
        else:
            room, sequence = free.pop(slot)
            members[sequence].append(index)
            room -= length
        bisect.insort(free, (room, sequence))
    sequences = [_concatenate([features[i] for i in group]) for group in members]
    return PackedDataset(sequences, len(features), max_length)


def _concatenate(examples: list[Feature]) -> Feature:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        ids = list(example["input_ids"])
        input_ids += ids
        labels += [IGNORE_INDEX, *example["labels"][1:]]
        position_ids += range(len(ids))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


class PackedCollator:
    """Right-pads packed sequences (PaddingCollator; padding gets position 0, so each pad
    token is an example of its own that carries no loss), with no attention mask and the
    cache off: both would make transformers ignore the examples' boundaries."""

    def __init__(self, pad_id: int) -> None:
        self._padding = PaddingCollator(pad_id)

    def __call__(self, features: list[Feature]) -> dict[str, Any]:
        batch: dict[str, Any] = dict(self._padding(features))
        if "position_ids" in batch:
            batch["use_cache"] = False
        return batch


def require_isolation(model: torch.nn.Module) -> None:
    """Refuses to pack for a model whose attention lets one packed example see another: a
    short random example's logits behind another one must equal its logits alone."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    attention = getattr(config, "_attn_implementation", None) or "default"
    embeddings: Any = model.get_input_embeddings()  # type: ignore[operator]
    generator = torch.Generator().manual_seed(0)
    first, second = (
        torch.randint(int(embeddings.num_embeddings), (1, n), generator=generator)
        for n in PROBE_LENGTHS
    )
    device = embeddings.weight.device
    packed_ids = torch.cat([first, second], dim=1).to(device)
    positions = torch.cat([torch.arange(n) for n in PROBE_LENGTHS]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=second.to(device), use_cache=False).logits
            packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits
    except (TypeError, ValueError) as exc:
        raise PermanentJobError(
            f"packing needs position ids, which a {model_type} model does not take: {exc}",
            FailureType.INVALID_SPEC,
        ) from exc
    finally:
        model.train(was_training)
    gap = float((packed[:, PROBE_LENGTHS[0] :].float() - alone.float()).abs().max())
    scale = max(float(alone.float().abs().max()), 1.0)
    if gap > PROBE_TOLERANCE * scale:
        raise PermanentJobError(
            f"packing refused: a {model_type} model with {attention} attention lets a packed "
            f"example attend to the one before it (its logits move by {gap:.3g}); train "
            "this model without packing",
            FailureType.INVALID_SPEC,
        )
    logger.info(
        "packed examples stay apart on %s with %s attention (gap %.3g)", model_type, attention, gap
    )
