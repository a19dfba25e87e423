from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from core.specs import GenerateJobRequest, GenerateSpec

GOOD: dict[str, Any] = {"model": "tiny-gpt2", "prompts": ["Hello"]}


def test_defaults() -> None:
    spec = GenerateSpec.model_validate(GOOD)
    assert spec.max_new_tokens == 64
    assert spec.do_sample
    assert spec.stop == []
    assert (spec.frequency_penalty, spec.presence_penalty) == (0.0, 0.0)
    assert spec.response_format is None


@pytest.mark.parametrize(
    "change",
    [
        {"prompts": []},
        {"prompts": ["   "]},
        {"prompts": [""]},
        {"max_new_tokens": 0},
        {"max_new_tokens": 100_000},
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"top_p": 0},
        {"top_k": -1},
        {"repetition_penalty": 0},
        {"num_return_sequences": 17},
        {"seed": -1},
        {"stop": ["x"] * 9},
        {"stop": [""]},
        {"model": ""},
        {"model": "/etc/passwd"},
        {"model": "models/../../secret"},
        {"temperature": 0, "num_return_sequences": 2},
        {"unknown_field": 1},
        {"frequency_penalty": 2.1},
        {"presence_penalty": -2.5},
    ],
)
def test_rejected(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GenerateSpec.model_validate({**GOOD, **change})


def test_request_refuses_unknown_kind_and_bad_priority() -> None:
    with pytest.raises(ValidationError):
        GenerateJobRequest.model_validate({"kind": "train", "spec": GOOD})
    with pytest.raises(ValidationError):
        GenerateJobRequest.model_validate({"kind": "generate", "spec": GOOD, "priority": 10})
    req = GenerateJobRequest.model_validate({"kind": "generate", "spec": GOOD, "priority": 9})
    assert req.priority == 9


def test_noop_request_defaults_and_bounds() -> None:
    from core.specs import NoopJobRequest, NoopSpec

    req = NoopJobRequest.model_validate({"kind": "noop"})
    assert req.spec.duration_s == 0
    with pytest.raises(ValidationError):
        NoopSpec.model_validate({"duration_s": -1})
