"""Loaded causal LMs kept per worker process: an LRU bounded by a memory budget.

A model is keyed by its reference and a revision (for a local directory, the
newest modification time of its weight and config files, so replaced files are
loaded afresh). LoRA adapters are loaded onto a cached base as named peft
adapters, so requests for different adapters share one base in memory and in a
decode group; the least recently used adapters are unloaded past `max_adapters`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.enums import FailureType
from core.errors import PermanentJobError
from core.heap import freeze_loaded_objects
from core.prompts import context_length
from workers.generation.grammar import Grammars

logger = logging.getLogger(__name__)

_REVISION_FILES = ("*.safetensors", "config.json", "tokenizer*.json", "adapter_config.json")


def revision_of(ref: str) -> str:
    path = Path(ref)
    if not path.is_dir():
        return "hub"
    stamps = [f.stat().st_mtime_ns for pattern in _REVISION_FILES for f in path.glob(pattern)]
    return str(max(stamps, default=0))


def model_bytes(model: Any) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def adapter_name(path: str) -> str:
    return "a_" + hashlib.sha1(path.encode()).hexdigest()[:16]


@dataclass
class CachedModel:
    ref: str
    revision: str
    model: Any
    tokenizer: Any
    device: str
    size_bytes: int
    load_s: float
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)  # path -> name
    _grammars: Grammars | None = field(default=None, repr=False)

    def grammars(self) -> Grammars:
        """This model's compiled response-format grammars, kept as long as the model is."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids, self.pad_id)
        return self._grammars

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif isinstance(configured, list):
            ids.update(int(i) for i in configured)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    @property
    def context_length(self) -> int | None:
        return context_length(self.model.config)


@dataclass(frozen=True)
class CacheOutcome:
    hit: bool
    load_s: float
    evicted: tuple[str, ...] = ()


def _missing_head(model: Any, missing: Iterable[str]) -> list[str]:
    """The weights outside the base transformer that the checkpoint did not have: the head
    the causal-LM class added with untrained weights (an encoder's checkpoint loaded as
    BertLMHeadModel lacks `cls.predictions.*`). A head tied to the input embeddings is not
    missing."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    return sorted(key for key in missing if prefix == "." or not key.startswith(prefix))[:3]


def _load(ref: str, device: str) -> tuple[Any, Any]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
        dtype: Any = torch.float32 if device == "cpu" else "auto"
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            ref,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=dtype,
            output_loading_info=True,
        )
        model, loading = loaded
    except (OSError, ValueError) as exc:
        raise PermanentJobError(
            f"cannot load model {ref!r}: {exc}", FailureType.MODEL_NOT_FOUND
        ) from exc
    head = _missing_head(model, loading.get("missing_keys", ()))
    if head:
        raise PermanentJobError(
            f"model {ref!r} has no language-model head (its checkpoint lacks {', '.join(head)}): "
            "text generation needs a causal language model, not an encoder",
            FailureType.INVALID_SPEC,
        )
    model.to(device)
    model.eval()
    return model, tokenizer


class ModelCache:
    def __init__(self, budget_bytes: int, max_adapters: int = 8) -> None:
        self._budget = budget_bytes
        self._max_adapters = max_adapters
        self._entries: OrderedDict[tuple[str, str, str], CachedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def refs(self) -> list[str]:
        with self._lock:
            return [e.ref for e in self._entries.values()]

    def get(self, ref: str, device: str) -> tuple[CachedModel, CacheOutcome]:
        key = (ref, revision_of(ref), device)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry, CacheOutcome(hit=True, load_s=0.0)
            started = time.perf_counter()
            model, tokenizer = _load(ref, device)
            load_s = time.perf_counter() - started
            entry = CachedModel(
                ref=ref,
                revision=key[1],
                model=model,
                tokenizer=tokenizer,
                device=device,
                size_bytes=model_bytes(model),
                load_s=load_s,
            )
            self.misses += 1
            self._entries[key] = entry
            evicted = self._evict_over_budget(keep=key)
        logger.info(
            "model cache: loaded %s in %.2fs (%d MB); evicted %s",
            ref,
            load_s,
            entry.size_bytes // 2**20,
            list(evicted) or "nothing",
        )
        # the model and the modules its loading imported, out of every full collection
        freeze_loaded_objects(f"model {ref}", released=bool(evicted))
        return entry, CacheOutcome(hit=False, load_s=load_s, evicted=evicted)

    def _evict_over_budget(self, keep: tuple[str, str, str]) -> tuple[str, ...]:
        evicted: list[str] = []
        while sum(e.size_bytes for e in self._entries.values()) > self._budget:
            victim = next((k for k in self._entries if k != keep), None)
            if victim is None:
                break
            evicted.append(self._entries.pop(victim).ref)
            self.evictions += 1
        if evicted and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return tuple(evicted)

    def adapter(self, entry: CachedModel, path: str, in_use: frozenset[str] = frozenset()) -> str:
        """The peft adapter name for `path` on `entry`'s base, loading it when new.

        Adapters named in `in_use` (rows still decoding with them) are never unloaded.
        """
        with self._lock:
            name = entry.adapters.get(path)
            if name is not None:
                entry.adapters.move_to_end(path)
                return name
            name = adapter_name(path)
            try:
                if not hasattr(entry.model, "peft_config"):
                    from peft import PeftModel

                    entry.model = PeftModel.from_pretrained(entry.model, path, adapter_name=name)
                else:
                    entry.model.load_adapter(path, adapter_name=name)
            except (OSError, ValueError, KeyError) as exc:
                raise PermanentJobError(
                    f"cannot load adapter {path!r}: {exc}", FailureType.MODEL_NOT_FOUND
                ) from exc
            entry.model.to(entry.device)
            entry.model.eval()
            entry.adapters[path] = name
            idle = [p for p, n in entry.adapters.items() if n not in in_use and n != name]
            unloaded = False
            while len(entry.adapters) > self._max_adapters and idle:
                old = entry.adapters.pop(idle.pop(0))
                entry.model.delete_adapter(old)
                unloaded = True
            logger.info("model cache: adapter %s loaded on %s as %s", path, entry.ref, name)
        freeze_loaded_objects(f"adapter {path}", released=unloaded)
        return name
