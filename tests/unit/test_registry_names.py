"""Registered model names carry the whole job id, so two fine-tunes never collide."""

from __future__ import annotations

from core.enums import FineTuneTask
from db.registry import is_registry_name, model_name


def test_job_ids_sharing_a_prefix_get_different_names() -> None:
    first = model_name("org/tiny-gpt2", FineTuneTask.CAUSAL_LM, "sdk", "job_deadbeef" + "0" * 24)
    second = model_name("org/tiny-gpt2", FineTuneTask.CAUSAL_LM, "sdk", "job_deadbeef" + "1" * 24)
    assert first != second
    assert first == "ft:tiny-gpt2:sdk:deadbeef" + "0" * 24
    assert is_registry_name(second)


def test_default_suffix_is_the_task() -> None:
    name = model_name("tiny", FineTuneTask.TOKEN_CLASSIFICATION, None, "job_abc")
    assert name == "ft:tiny:token-classification:abc"
