"""A decode group: sequences decoded together, that join and leave between steps.

Sequences are left-padded into one key/value cache. A joining group is prefilled
on its own and then merged in (the shorter cache gets padding on the left);
finished sequences are dropped from the cache, and columns that only padding
still uses are cut off. Positions and attention masks are kept per row, so each
row sees exactly the tokens it would see alone.

`admit` and `step` change nothing when they raise (an out-of-memory, say): the caller
can drop a request's rows and go on with the others.

Rows that ask for log probabilities get them from the same logits their token is chosen
from, before sampling changes them (see logprobs.py); the other rows cost nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from workers.generation.logprobs import TokenLogprob, row_logprobs
from workers.generation.sampling import RowSampling, choose_tokens
from workers.generation.text import SequenceText

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter forward
_COUNT_DTYPE = torch.int16  # max_new_tokens is at most 4096


class TokenConstraint(Protocol):
    """What a row's output must match (a grammar), as the decode group needs it."""

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """The tokens this row may choose next: [vocab_size] bool on the CPU; never all False."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advance past the chosen token; True when the output is now complete."""
        ...


@dataclass
class Row:
    owner: Any  # whatever the engine uses to find the request this row belongs to
    prompt_index: int
    sequence_index: int
    prompt_ids: list[int]
    sampling: RowSampling
    max_new_tokens: int
    text: SequenceText
    adapter: str = BASE_ADAPTER
    generated: int = 0  # tokens chosen so far, end-of-text included
    constraint: TokenConstraint | None = None  # a response format's grammar
    top_logprobs: int | None = None  # None: no log probabilities; else how many alternatives


class UnsupportedCache(Exception):
    """The model keeps a cache a decode group cannot merge (sliding windows, recurrent state)."""


def _left_pad(t: torch.Tensor, width: int, dim: int, value: float = 0) -> torch.Tensor:
    if width == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [width, 0]
    return F.pad(t, pad, value=value)


class _RandomState:
    """The sampling rows' generator states, to put back when a step is undone."""

    def __init__(self, rows: list[Row]) -> None:
        self._saved = [
            (r.sampling.generator, r.sampling.generator.get_state())
            for r in rows
            if r.sampling.generator is not None
        ]

    def restore(self) -> None:
        for generator, state in self._saved:
            generator.set_state(state)


class DecodeGroup:
    def __init__(self, model: Any, device: str, pad_id: int, vocab_size: int) -> None:
        self._model = model
        self._device = device
        self._pad = pad_id
        self._vocab = vocab_size
        self._peft = hasattr(model, "peft_config")
        self.rows: list[Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self._positions = torch.zeros((0,), dtype=torch.long, device=device)
        self._pending = torch.zeros((0,), dtype=torch.long, device=device)
        self._seen = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)
        self._counts = torch.zeros((0, vocab_size), dtype=_COUNT_DTYPE, device=device)

    def refresh_model(self, model: Any) -> None:
        """Use `model` from now on (the cache wrapped the base in a peft model)."""
        self._model = model
        self._peft = hasattr(model, "peft_config")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return int(self._mask.shape[1])

    def _forward(self, rows: list[Row], **kwargs: Any) -> Any:
        if self._peft:
            kwargs["adapter_names"] = [r.adapter for r in rows]
        return self._model(use_cache=True, logits_to_keep=1, **kwargs)

    def admit(self, rows: list[Row]) -> list[Row]:
        """Prefill `rows`, choose their first tokens and merge them in. Returns rows now done."""
        if not rows:
            return []
        length = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), length), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, length - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self._forward(
            rows,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
        )
        seen = torch.zeros((len(rows), self._vocab), dtype=torch.bool, device=self._device)
        for i, r in enumerate(rows):
            seen[i, torch.tensor(r.prompt_ids, device=self._device).clamp(max=self._vocab - 1)] = (
                True
            )
        counts = torch.zeros((len(rows), self._vocab), dtype=_COUNT_DTYPE, device=self._device)
        draws = _RandomState(rows)
        try:
            tokens = choose_tokens(
                out.logits[:, -1, :],
                [r.sampling for r in rows],
                seen,
                counts,
                self._allowed(rows),
            )
            logprobs = self._logprobs(out.logits[:, -1, :], tokens, rows)
            self._merge(rows, out.cache, mask, mask.sum(-1), seen, counts)
        except BaseException:
            draws.restore()  # a row admitted again later draws what it would have drawn
            raise
        return self._take(tokens, first=len(self.rows) - len(rows), logprobs=logprobs)

    def step(self) -> list[Row]:
        """Feed every row its last chosen token and choose the next. Returns rows now done."""
        if not self.rows:
            return []
        width = self.width
        ones = torch.ones((len(self.rows), 1), dtype=torch.long, device=self._device)
        mask = torch.cat([self._mask, ones], dim=1)
        draws = _RandomState(self.rows)
        try:
            out = self._forward(
                self.rows,
                input_ids=self._pending.unsqueeze(1),
                attention_mask=mask,
                position_ids=self._positions.unsqueeze(1),
                cache=self._cache,
            )
            tokens = choose_tokens(
                out.logits[:, -1, :],
                [r.sampling for r in self.rows],
                self._seen,
                self._counts,
                self._allowed(self.rows),
            )
            logprobs = self._logprobs(out.logits[:, -1, :], tokens, self.rows)
        except BaseException:
            draws.restore()
            self._cut_cache(width)  # the layers the failed forward had already extended
            raise
        self._mask = mask
        self._positions = self._positions + 1
        return self._take(tokens, first=0, logprobs=logprobs)

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, tokens: torch.Tensor, rows: list[Row]
    ) -> dict[int, TokenLogprob]:
        """The chosen tokens' entries of the rows that asked, by their place in `rows`."""
        asked = [i for i, r in enumerate(rows) if r.top_logprobs is not None]
        tops = [rows[i].top_logprobs or 0 for i in asked]
        return row_logprobs(logits, tokens, asked, tops)

    def _allowed(self, rows: list[Row]) -> torch.Tensor | None:
        """[len(rows), vocab] bool: what each row's constraint allows (None when no row has
        one). Reading a constraint does not advance it, so a step that fails after this
        leaves every row as it was."""
        if all(r.constraint is None for r in rows):
            return None
        allowed = torch.ones((len(rows), self._vocab), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r.constraint is not None:
                allowed[i] = r.constraint.allowed(self._vocab)
        return allowed.to(self._device)

    def _cut_cache(self, width: int) -> None:
        if self._cache is None:
            return
        for layer in self._layers(self._cache):
            if layer.keys.shape[2] > width:
                layer.keys = layer.keys[:, :, :width, :]
                layer.values = layer.values[:, :, :width, :]

    def drop(self, rows: list[Row]) -> None:
        """Remove rows (finished, stopped or failed) from the group and its cache."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache = None
            self._mask = self._mask[:0, :0]
            self._positions, self._pending, self._seen, self._counts = (
                self._positions[:0],
                self._pending[:0],
                self._seen[:0],
                self._counts[:0],
            )
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._device)
        assert self._cache is not None
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._positions = self._positions[index]
        self._pending = self._pending[index]
        self._seen = self._seen[index]
        self._counts = self._counts[index]
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            self._mask = self._mask[:, start:]
            for layer in self._layers(self._cache):
                layer.keys = layer.keys[:, :, start:, :]
                layer.values = layer.values[:, :, start:, :]

    @staticmethod
    def _layers(cache: DynamicCache) -> list[Any]:
        layers = list(getattr(cache, "layers", []))
        for layer in layers:
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise UnsupportedCache(type(layer).__name__)
        return layers

    def _merge(
        self,
        rows: list[Row],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        seen: torch.Tensor,
        counts: torch.Tensor,
    ) -> None:
        """Merge a prefilled group in: every new tensor is built before any is kept."""
        if self._cache is None or not self.rows:
            self._layers(cache)
            pending = torch.zeros((len(rows),), dtype=torch.long, device=self._device)
            self._cache, self._mask, self._positions = cache, mask, positions
            self._pending, self._seen, self._counts = pending, seen, counts
            self.rows = list(rows)
            return
        width = max(self.width, int(mask.shape[1]))
        old_pad, new_pad = width - self.width, width - int(mask.shape[1])
        old_layers, new_layers = self._layers(self._cache), self._layers(cache)
        merged = [
            (
                torch.cat([_left_pad(old.keys, old_pad, 2), _left_pad(new.keys, new_pad, 2)]),
                torch.cat([_left_pad(old.values, old_pad, 2), _left_pad(new.values, new_pad, 2)]),
            )
            for old, new in zip(old_layers, new_layers, strict=True)
        ]
        merged_mask = torch.cat([_left_pad(self._mask, old_pad, 1), _left_pad(mask, new_pad, 1)])
        merged_positions = torch.cat([self._positions, positions])
        filler = torch.zeros((len(rows),), dtype=torch.long, device=self._device)
        merged_pending = torch.cat([self._pending, filler])
        merged_seen = torch.cat([self._seen, seen])
        merged_counts = torch.cat([self._counts, counts])
        for layer, (keys, values) in zip(old_layers, merged, strict=True):
            layer.keys, layer.values = keys, values
        self._mask, self._positions = merged_mask, merged_positions
        self._pending, self._seen = merged_pending, merged_seen
        self._counts = merged_counts
        self.rows.extend(rows)

    def _take(
        self, tokens: torch.Tensor, first: int, logprobs: dict[int, TokenLogprob]
    ) -> list[Row]:
        """Keep the tokens chosen for rows[first:] (with the entries of those that asked for
        log probabilities, by their place among them); return the rows that ended."""
        rows = self.rows[first:]
        self._pending[first:] = tokens
        index = torch.arange(first, len(self.rows), device=self._device)
        self._seen[index, tokens] = True
        self._counts[index, tokens] += 1
        done: list[Row] = []
        for i, (r, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            r.generated += 1
            complete = r.constraint is not None and r.constraint.accept(token)
            r.text.add(
                token,
                last_allowed=r.generated >= r.max_new_tokens,
                complete=complete,
                logprob=logprobs.get(i),
            )
            if r.text.finished:
                done.append(r)
        return done
