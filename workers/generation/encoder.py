"""Sentence encoders on a worker: AutoModel's last hidden state, mean-pooled over the
attention mask and L2-normalized (sentence-transformers' recipe for MiniLM and its kin),
shared by retrieval (workers/generation/retrieval.py) and embedding jobs
(workers/embedding/jobs.py), so the vectors of both are the same for the same text.

Loaded encoders are kept per process in a small LRU keyed like the causal-LM cache
(reference, revision of the files, device): a sentence encoder is a few tens of MB, and a
worker rarely serves more than one or two.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.embeddings import input_limit
from core.enums import FailureType
from core.errors import PermanentJobError
from workers.generation.cache import CacheOutcome, revision_of

logger = logging.getLogger(__name__)

ENCODERS_KEPT = 2


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of each row's hidden states over its unmasked positions, L2-normalized
    (so a dot product is the cosine similarity)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


@dataclass(frozen=True)
class Encoder:
    model: Any
    tokenizer: Any
    device: str

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def limit(self) -> int | None:
        """The most tokens one input may have (core.embeddings.input_limit)."""
        return input_limit(self.model.config, getattr(self.tokenizer, "model_max_length", None))

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    def token_ids(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Each text's ids with the model's special tokens; cut at `max_length` if given."""
        encoded = self.tokenizer(
            list(texts), truncation=max_length is not None, max_length=max_length
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def encode(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """One forward pass over right-padded token ids: a normalized vector per row (on
        the CPU, float32)."""
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        with torch.inference_mode():
            hidden = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).last_hidden_state.float()
        return mean_pool(hidden, attention_mask.to(self.device)).cpu()

    def embed(self, texts: list[str], batch_size: int, max_length: int) -> torch.Tensor:
        """Vectors of `texts` (each cut at `max_length` tokens), `batch_size` per pass."""
        ids = self.token_ids(texts, max_length)
        starts = range(0, len(ids), batch_size)
        return torch.cat([self.encode(ids[start : start + batch_size]) for start in starts])


def _load(ref: str, device: str) -> Encoder:
    from transformers import AutoModel, AutoTokenizer

    logger.info("loading sentence encoder %s on %s", ref, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
        model = AutoModel.from_pretrained(ref, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise PermanentJobError(
            f"cannot load embedding model {ref!r}: {exc}", FailureType.MODEL_NOT_FOUND
        ) from exc
    model.to(device)
    model.eval()
    return Encoder(model, tokenizer, device)


class EncoderCache:
    """The last `size` encoders used in this process."""

    def __init__(self, size: int = ENCODERS_KEPT) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[str, str, str], Encoder] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: str, device: str) -> tuple[Encoder, CacheOutcome]:
        key = (ref, revision_of(ref), device)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found, CacheOutcome(hit=True, load_s=0.0)
            started = time.perf_counter()
            encoder = _load(ref, device)
            self._entries[key] = encoder
            evicted: list[str] = []
            while len(self._entries) > self._size:
                evicted.append(self._entries.popitem(last=False)[0][0])
        return encoder, CacheOutcome(
            hit=False, load_s=time.perf_counter() - started, evicted=tuple(evicted)
        )


_ENCODERS = EncoderCache()


def get_encoder(ref: str, device: str) -> tuple[Encoder, CacheOutcome]:
    """The encoder at `ref` (a local directory or an allowed hub id) from this process's
    cache, loading it on a miss; PermanentJobError `model_not_found` if it cannot load."""
    return _ENCODERS.get(ref, device)


def load_encoder(ref: str, device: str) -> Encoder:
    return get_encoder(ref, device)[0]
