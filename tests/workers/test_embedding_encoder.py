"""Mean pooling over the attention mask, and the encoder's padded passes: padding and
batching change nothing, and retrieval and embedding jobs share the same vectors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.tiny_encoder import build_tiny_encoder, reference_embeddings
from workers.generation.encoder import EncoderCache, mean_pool


def test_mean_pool_averages_unmasked_positions_and_normalizes() -> None:
    hidden = torch.tensor([[[3.0, 0.0], [1.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    pooled = mean_pool(hidden, mask)
    mean = torch.tensor([2.0, 2.0])
    torch.testing.assert_close(pooled, (mean / mean.norm()).unsqueeze(0))
    empty = mean_pool(torch.ones(1, 2, 2), torch.zeros(1, 2, dtype=torch.long))
    torch.testing.assert_close(empty, torch.zeros(1, 2))  # no token: no division by zero


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("models") / "tiny-encoder")


def test_padded_passes_give_each_input_its_vector_alone(encoder_dir: Path) -> None:
    encoder, outcome = EncoderCache().get(str(encoder_dir), "cpu")
    assert not outcome.hit and encoder.width == 32 and encoder.limit == 512
    texts = ["quiet", "The hotel room was clean, quiet and good value.", "Alan Turing"]
    ids = encoder.token_ids(texts)
    together = encoder.encode(ids)
    torch.testing.assert_close(
        together, torch.tensor(reference_embeddings(encoder_dir, texts)), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(encoder.embed(texts, 2, 512), together, atol=1e-6, rtol=0)
    cut = encoder.token_ids(texts, max_length=4)
    assert max(len(row) for row in cut) == 4


def test_the_cache_keeps_the_last_encoders(encoder_dir: Path, tmp_path: Path) -> None:
    cache = EncoderCache(size=1)
    first, _ = cache.get(str(encoder_dir), "cpu")
    again, outcome = cache.get(str(encoder_dir), "cpu")
    assert again is first and outcome.hit
    other = build_tiny_encoder(tmp_path / "other", seed=1)
    _, loaded = cache.get(str(other), "cpu")
    assert loaded.evicted == (str(encoder_dir),)
