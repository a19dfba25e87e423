"""The embeddings request as a spec (OpenAI's four input shapes, refusals naming the input),
vectors as little-endian float32 base64 (as the openai SDK decodes them), input limits."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from core.embeddings import base64_to_vector, input_limit, vector_to_base64
from core.enums import QUEUE_FOR_KIND, JobKind
from core.specs import SPEC_FOR_KIND, EmbedJobRequest, EmbedSpec


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("hello", ["hello"]),
        (["a", "b c"], ["a", "b c"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
        (" ", [" "]),  # whitespace is text: OpenAI embeds it too
    ],
)
def test_each_input_shape_is_stored_as_a_list(given: Any, stored: Any) -> None:
    spec = EmbedSpec(model="m", input=given)
    assert spec.input == stored
    texts = isinstance(stored[0], str)
    assert spec.texts == (stored if texts else None)
    assert spec.token_ids == (None if texts else stored)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "input[0] is an empty string"),
        ([], "non-empty array"),
        ([[]], "input[0] is an empty array of token ids"),
        (["a", [1]], "input[1] is not a string"),
        ([[1], "a"], "input[1] is not an array of token ids"),
        ([True, 1], "input[0] is not"),
        ([1.0], "input[0] is not"),
        ([[-1]], "token id outside"),
        (["x"] * 2049, "at most 2048 inputs"),
        (None, "give a string"),
    ],
)
def test_bad_inputs_are_refused_with_one_message(given: Any, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        EmbedSpec(model="m", input=given)
    errors = refused.value.errors()
    assert len(errors) == 1 and errors[0]["loc"] == ("input",)
    assert message in errors[0]["msg"]


def test_the_kind_routes_like_the_others() -> None:
    req = EmbedJobRequest.model_validate({"kind": "embed", "spec": {"model": "m", "input": "x"}})
    assert req.spec.model_dump() == {"model": "m", "input": ["x"], "dimensions": None}
    assert SPEC_FOR_KIND[JobKind.EMBED] is EmbedSpec
    assert QUEUE_FOR_KIND[JobKind.EMBED] == "generate"
    with pytest.raises(ValidationError):
        EmbedSpec(model="../x", input="x")


def test_base64_is_little_endian_float32_as_the_sdk_decodes_it() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype("<f4")
    encoded = vector_to_base64(vector.tolist())
    assert len(encoded) == 2048  # 384 * 4 bytes
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), dtype="float32"), vector)
    assert base64_to_vector(encoded) == vector.tolist()  # each float exactly its float32


def test_the_input_limit_is_the_smaller_of_positions_and_tokenizer_length() -> None:
    assert input_limit({"max_position_embeddings": 512}, 1e30) == 512
    assert input_limit({"max_position_embeddings": 514}, 512) == 512
    assert input_limit({"n_positions": 1024}, None) == 1024
    assert input_limit({}, 256) == 256
    assert input_limit({}, int(1e30)) is None
