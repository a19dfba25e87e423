"""Log probabilities of generated tokens, as OpenAI returns them.

The values are the model's own distribution at each position: log_softmax of its logits
before anything sampling does to them (temperature, top-p/top-k, penalties, a response
format's mask), as vLLM returns by default. So a greedy row's chosen token is always the
most likely one, and a value does not depend on the row's sampling parameters.

They are computed only for the rows that asked (`Row.top_logprobs` is not None), in the
decode group where the tokens are chosen, and kept per token in the row's SequenceText.
An entry is turned into OpenAI's shape here: `{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}, ...]}` (the chat completion shape; the
legacy completions shape is built from it in core.completions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from db.outputs import storable_text

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece's byte fallback


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One chosen token's log probability and the `top` most likely at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def row_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], tops: list[int]
) -> dict[int, TokenLogprob]:
    """The entries of the chosen `tokens` for the rows at `rows` (with `tops[i]` alternatives
    each) from last-position logits [B, V]; only those rows' logits are normalised."""
    if not rows:
        return {}
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = logp.gather(1, tokens.index_select(0, index).unsqueeze(1)).squeeze(1).tolist()
    k = max(tops)
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if k > 0:
        values, ids = torch.topk(logp, min(k, logp.shape[1]), dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    picked = tokens.index_select(0, index).tolist()
    out: dict[int, TokenLogprob] = {}
    for j, (row, n) in enumerate(zip(rows, tops, strict=True)):
        top = tuple(zip(top_ids[j][:n], top_values[j][:n], strict=True)) if n else ()
        out[row] = TokenLogprob(int(picked[j]), float(chosen[j]), top)
    return out


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    """The entries of a prompt's tokens after its first, from the logits [L, V] of one
    forward pass over it: token i's at position i - 1 (`row_logprobs` with each position a
    row), with `top` alternatives; a chunk of positions at a time (a long prompt's [L, V]
    floats are not doubled at once)."""
    out: list[TokenLogprob] = []
    chunk = 256
    for start in range(0, len(ids) - 1, chunk):
        stop = min(start + chunk, len(ids) - 1)
        tokens = torch.tensor(ids[start + 1 : stop + 1], device=logits.device)
        positions = list(range(stop - start))
        found = row_logprobs(logits[start:stop], tokens, positions, [top] * len(positions))
        out += [found[p] for p in positions]
    return out


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte, inverted: the bytes
    printable in Latin-1 stand for themselves, the others are moved up past 255 in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in kept}
    shift = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + shift)] = b
            shift += 1
    return table


@lru_cache(maxsize=1)
def _byte_level() -> dict[str, int]:
    return _byte_level_table()


def _is_byte_level(tokenizer: Any) -> bool:
    if getattr(tokenizer, "byte_decoder", None) is not None:
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


class TokenStrings:
    """Each token id's text and bytes for one tokenizer, remembered once computed."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._seen: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        known = self._seen.get(token_id)
        if known is None:
            known = self._seen[token_id] = self._compute(token_id)
        return known

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        text = str(self._tok.decode([token_id]))
        return storable_text(text), self._bytes(token_id, text)

    def _bytes(self, token_id: int, text: str) -> list[int]:
        """The token's own bytes: a byte-level token may hold part of a UTF-8 character,
        which its decoded text (U+FFFD) no longer shows."""
        piece = self._tok.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self._byte_level:
                table = _byte_level()
                if piece and all(ch in table for ch in piece):
                    return [table[ch] for ch in piece]
            match = _BYTE_TOKEN.match(piece)
            if match:
                return [int(match.group(1), 16)]
        return list(text.encode("utf-8"))

    def entry(self, lp: TokenLogprob) -> dict[str, Any]:
        """One token's entry in OpenAI's chat shape."""
        token, raw = self(lp.token_id)
        top = []
        for token_id, value in lp.top:
            alt, alt_raw = self(token_id)
            top.append({"token": alt, "logprob": value, "bytes": alt_raw})
        return {"token": token, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}
