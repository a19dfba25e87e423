"""What the embeddings API and the embedding worker agree on: how a vector is stored and
answered (little-endian float32, base64: what OpenAI's `encoding_format=base64` sends and
its SDK decodes), and how many tokens one input may have.

Vectors are stored as that base64 string in each output's `data` rather than as a JSON
list of floats: for a 384-wide vector the row's data is 2.1 kB against 8.4 kB, and 512 rows
write 5x faster and read back as floats 4-6x faster on SQLite and PostgreSQL
(bench/embedding_storage.py); it keeps float32 exactly and is already the wire format of
base64 answers. The standard library's
`array` does the conversion, so the API needs neither numpy nor torch.
"""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Iterable, Mapping
from typing import Any

from core.prompts import context_length

EMBEDDING_FINISH_REASON = "embedding"  # an output row's finish_reason in an embed job
EMBEDDING_KEY = "embedding"  # the key of an output's data that holds the base64 vector
_FLOAT32 = "f"


def _float32(values: Iterable[float]) -> array[float]:
    vector = array(_FLOAT32, values)
    if vector.itemsize != 4:
        raise RuntimeError("this platform's C float is not 32 bits")
    return vector


def vector_to_base64(values: Iterable[float]) -> str:
    """Little-endian float32 bytes of `values`, base64-encoded."""
    vector = _float32(values)
    if sys.byteorder != "little":
        vector.byteswap()
    return base64.b64encode(vector.tobytes()).decode("ascii")


def base64_to_vector(encoded: str) -> list[float]:
    """The floats of a little-endian float32 base64 string (each exactly its float32)."""
    vector = _float32(())
    vector.frombytes(base64.b64decode(encoded, validate=True))
    if sys.byteorder != "little":
        vector.byteswap()
    return vector.tolist()


def input_limit(config: Mapping[str, Any] | Any, model_max_length: Any) -> int | None:
    """The most tokens (special tokens included) one input may have: the model's positions,
    or the tokenizer's own `model_max_length` when that is smaller (a RoBERTa-style config
    counts two positions it cannot use; a tokenizer without a limit says 1e30)."""
    limits = [context_length(config)]
    if isinstance(model_max_length, int) and 0 < model_max_length < 1_000_000:
        limits.append(model_max_length)
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None
