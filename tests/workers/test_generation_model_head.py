"""The generation worker refuses a checkpoint without a language-model head: an encoder
loaded as a causal LM gets a head of untrained weights and would answer noise. (A local
one is refused at submit already, tests/api/test_generate_checks.py; this is a hub id's
or a directory's that changed after the submit.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.enums import FailureType
from core.errors import PermanentJobError
from tests.support.tiny_encoder import build_tiny_encoder
from workers.generation.cache import _load


def test_an_encoder_checkpoint_is_refused_naming_its_missing_head(tmp_path: Path) -> None:
    encoder = build_tiny_encoder(tmp_path / "encoder")
    with pytest.raises(PermanentJobError) as refused:
        _load(str(encoder), "cpu")
    assert refused.value.failure is FailureType.INVALID_SPEC
    assert "language-model head" in str(refused.value)
    assert "cls.predictions" in str(refused.value)


def test_a_causal_lm_with_a_tied_head_loads(tiny_model_dir: Path) -> None:
    """GPT-2's head is tied to its input embeddings: not in the checkpoint, not missing."""
    model, tokenizer = _load(str(tiny_model_dir), "cpu")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert tokenizer is not None
