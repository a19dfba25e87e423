"""Choosing each row's next token with that row's own sampling parameters.

Every operation here is row-wise, so a row's choice depends only on its own
logits, parameters and random generator, never on the other rows decoded with it.
The order follows transformers' `generate`: repetition penalty, then OpenAI's
frequency and presence penalties (on the tokens the row generated, not its prompt),
then OpenAI's logit biases, then the grammar's allowed set for rows with a response
format, temperature, top-k, top-p, and a draw (or argmax when greedy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass
class RowSampling:
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    generator: torch.Generator | None  # None for greedy rows
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # OpenAI's logit_bias: token ids [K] long and what is added to their logits [K] float
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None

    @property
    def counts_tokens(self) -> bool:
        """Whether this row's choice depends on how often it generated each token."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def row_bias(bias: Mapping[int, float]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A spec's logit_bias as RowSampling's (bias_ids, bias_values); (None, None) for none."""
    if not bias:
        return None, None
    ids = torch.tensor(list(bias), dtype=torch.long)
    return ids, torch.tensor(list(bias.values()), dtype=torch.float32)


def add_biases(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """OpenAI's logit_bias: each row's biases added to its tokens' logits [B, V] float."""
    biased = [(i, r) for i, r in enumerate(rows) if r.bias_ids is not None]
    if not biased:
        return logits
    logits = logits.clone()
    for i, r in biased:
        assert r.bias_ids is not None and r.bias_values is not None
        ids = r.bias_ids.to(logits.device)
        logits[i].index_add_(0, ids, r.bias_values.to(logits.device, logits.dtype))
    return logits


def row_generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def penalize_repeats(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """Make already seen tokens less likely: divide positive scores, multiply negative ones.

    logits [B, V] float, seen [B, V] bool, penalty [B] float (1.0 leaves a row alone).
    """
    p = penalty.to(logits.dtype).unsqueeze(1)
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalized, logits)


def penalize_counts(
    logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties: logit -= presence * (count > 0) + frequency * count.

    logits [B, V] float, counts [B, V] (how often each row generated each token),
    frequency and presence [B] float (0.0 leaves a row alone).
    """
    c = counts.to(logits.dtype)
    f = frequency.to(logits.dtype).unsqueeze(1)
    p = presence.to(logits.dtype).unsqueeze(1)
    return logits - f * c - p * (c > 0).to(logits.dtype)


def _filtered_probs(logits: torch.Tensor, row: RowSampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted token ids and their probabilities after temperature, top-k and top-p."""
    scores = logits.float() / row.temperature
    sorted_scores, sorted_ids = torch.sort(scores, descending=True)
    if row.top_k > 0:
        sorted_scores[row.top_k :] = float("-inf")
    if row.top_p < 1.0:
        probs = torch.softmax(sorted_scores, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
        drop = before > row.top_p
        drop[0] = False
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return sorted_ids, torch.softmax(sorted_scores, dim=-1)


def choose_tokens(
    logits: torch.Tensor,
    rows: list[RowSampling],
    seen: torch.Tensor | None,
    counts: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token id per row ([B] long, on logits' device) from last-position logits [B, V].

    `counts` [B, V] holds how often each row generated each token so far (None skips the
    frequency and presence penalties); `allowed` [B, V] bool, where given, is the set of tokens
    each row may choose (all True for rows without a constraint) and must allow at least one.
    """
    logits = logits.float()
    if seen is not None:
        penalty = torch.tensor([r.repetition_penalty for r in rows], device=logits.device)
        if bool((penalty != 1.0).any()):
            logits = penalize_repeats(logits, seen, penalty)
    if counts is not None and any(r.counts_tokens for r in rows):
        frequency = torch.tensor([r.frequency_penalty for r in rows], device=logits.device)
        presence = torch.tensor([r.presence_penalty for r in rows], device=logits.device)
        logits = penalize_counts(logits, counts, frequency, presence)
    logits = add_biases(logits, rows)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    chosen = torch.argmax(logits, dim=-1)
    sampled = [i for i, r in enumerate(rows) if r.do_sample]
    if sampled:
        cpu_logits = logits[sampled].cpu()
        picks = []
        for j, i in enumerate(sampled):
            ids, probs = _filtered_probs(cpu_logits[j], rows[i])
            draw = torch.multinomial(probs, 1, generator=rows[i].generator)
            picks.append(ids[draw])
        chosen[sampled] = torch.cat(picks).to(chosen.device)
    return chosen
