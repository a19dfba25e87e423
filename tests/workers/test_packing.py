"""Sequence packing: examples packed together keep the logits and loss they have alone
(tiny GPT-2 and Llama, sdpa and eager); models that cannot keep them apart are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from core.enums import FailureType
from core.errors import PermanentJobError
from tests.support.tiny_model import CHAT_TEMPLATE
from workers.training.data import (
    IGNORE_INDEX,
    Feature,
    PaddingCollator,
    encode_chat,
    encode_prompt_completion,
    encode_text,
)
from workers.training.packing import PackedCollator, pack_features, require_isolation


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def mixed_examples(tokenizer: Any) -> list[Feature]:
    """Text, prompt/completion (loss on the completion) and templated chat rows."""
    tokenizer.chat_template = CHAT_TEMPLATE
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the blue mug"}]
    return [
        encode_text(tokenizer, "The blue mug keeps coffee warm for hours.", 64),
        encode_prompt_completion(tokenizer, "Write about bread:", " fresh every morning", 64),
        encode_chat(tokenizer, chat, 64),
        encode_text(tokenizer, "Thank you for your patience.", 64),
        encode_prompt_completion(tokenizer, "Q: support? A:", " within one day", 64),
        encode_text(tokenizer, "Our support team answers every question.", 64),
    ]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each position's loss on the next label (0 where that label is -100)."""
    return torch.nn.functional.cross_entropy(
        logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_a_packed_example_has_the_logits_and_loss_it_has_alone(
    tiny_model_dir: Path, architecture: str, attention: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model: Any = (
        GPT2LMHeadModel.from_pretrained(str(tiny_model_dir))
        if architecture == "gpt2"
        else tiny_llama(len(tokenizer))
    )
    model.config._attn_implementation = attention
    model.eval()
    examples = mixed_examples(tokenizer)
    packed = pack_features(examples, max_length=40)
    assert len(packed) < len(examples)
    assert all(len(s["input_ids"]) <= 40 for s in packed.features)
    batch = PackedCollator(pad_id=tokenizer.pad_token_id)(packed.features)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    # each example's span in the packed batch, found from its position ids restarting at 0
    seen = 0
    for row, sequence in enumerate(packed.features):
        starts = [i for i, p in enumerate(sequence["position_ids"]) if p == 0]
        ends = [*starts[1:], len(sequence["input_ids"])]
        for start, end in zip(starts, ends, strict=True):
            ids = sequence["input_ids"][start:end]
            example = next(e for e in examples if e["input_ids"] == ids)
            alone_batch = PaddingCollator(pad_id=tokenizer.pad_token_id)([example])
            with torch.no_grad():
                alone = model(
                    input_ids=alone_batch["input_ids"],
                    attention_mask=alone_batch["attention_mask"],
                ).logits[0]
            inside = packed_logits[row, start:end]
            torch.testing.assert_close(inside, alone, atol=1e-5, rtol=1e-5)
            # labels survive packing (completion-only and chat masks included), except the
            # first, which would be learned from the previous example's last token
            packed_labels = batch["labels"][row, start:end]
            assert packed_labels[0].item() == IGNORE_INDEX
            assert packed_labels[1:].tolist() == example["labels"][1:]
            torch.testing.assert_close(
                token_losses(inside, packed_labels),
                token_losses(alone, torch.tensor(example["labels"])),
                atol=1e-5,
                rtol=1e-5,
            )
            seen += 1
    assert seen == len(examples)
    require_isolation(model)  # the probe the runner uses agrees


def test_packing_fits_examples_best_fit_decreasing_and_is_deterministic() -> None:
    features = [
        {"input_ids": [n] * n, "labels": [n] * n, "attention_mask": [1] * n}
        for n in (2, 5, 3, 5, 3, 2)
    ]
    packed = pack_features(features, max_length=8)
    assert [s["input_ids"] for s in packed.features] == [
        [5] * 5 + [3] * 3,
        [5] * 5 + [3] * 3,
        [2] * 2 + [2] * 2,
    ]
    assert packed.features[2]["position_ids"] == [0, 1, 0, 1]
    assert packed.features[2]["labels"] == [IGNORE_INDEX, 2, IGNORE_INDEX, 2]
    assert (packed.examples, packed.tokens) == (6, 20)
    assert packed.fill == pytest.approx(20 / 24)
    assert pack_features(features, max_length=8).features == packed.features
    with pytest.raises(ValueError, match="longer than 4"):
        pack_features(features, max_length=4)


def test_a_model_whose_attention_mixes_packed_examples_is_refused() -> None:
    """BLOOM's ALiBi biases come from the attention mask, not the position ids."""
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=2))
    model.train()
    with pytest.raises(PermanentJobError) as refused:
        require_isolation(model)
    assert refused.value.failure is FailureType.INVALID_SPEC
    assert "packing refused: a bloom model" in str(refused.value)
    assert model.training  # the probe leaves the model as it found it
