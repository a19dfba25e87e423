"""A sequence's text as its tokens arrive: stop strings, end of text, and stream deltas.

The stored text and the streamed deltas come from the same place: whatever was
streamed is always a prefix of the final text, and the last delta completes it.
To keep that true with stop strings, the tail that could still turn out to be
the start of a stop string is held back until it cannot.

A row that asked for log probabilities keeps one entry per token of `ids` (the
completion's tokens: end-of-text is not one of them, the token in which a stop string
completed is, though the text is cut before the stop string). A streamed entry is
released with the delta that releases the last of its token's text; entries still held
when the sequence finishes go with its last delta.
"""

from __future__ import annotations

from typing import Any

from core.enums import FinishReason
from workers.generation.logprobs import TokenLogprob

_INCOMPLETE = "\ufffd"  # a multi-byte character split across tokens decodes to this


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the earliest stop sequence, and whether one was found."""
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


class SequenceText:
    def __init__(
        self, tokenizer: Any, stops: list[str], eos_ids: frozenset[int], *, stream: bool
    ) -> None:
        self._tok = tokenizer
        self._stream = stream
        self._stops = stops
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self._eos = eos_ids
        self.ids: list[int] = []
        self._text = ""
        self._streamed = ""
        self.finish_reason: FinishReason | None = None
        self.logprobs: list[TokenLogprob] = []  # one per id, for rows that asked
        self._ends: list[int] = []  # len of the decoded text once each logprob's token was in
        self._released = 0  # logprob entries given out with deltas

    def add(
        self,
        token_id: int,
        *,
        last_allowed: bool,
        complete: bool = False,
        logprob: TokenLogprob | None = None,
    ) -> None:
        """Take one generated token; `last_allowed` means max_new_tokens is now reached,
        `complete` that the row's response format is now satisfied (a natural stop),
        `logprob` its entry when the row asked for log probabilities."""
        if token_id in self._eos:
            self.finish_reason = FinishReason.STOP
            return
        self.ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self._stream or self._stops:
            self._text = self._decode()
            if logprob is not None:
                self._ends.append(len(self._text))  # before a stop string cuts it
            if self._stops:
                cut, found = cut_at_stop(self._text, self._stops)
                if found:
                    self._text = cut
                    self.finish_reason = FinishReason.STOP
                    return
        if complete:
            self.finish_reason = FinishReason.STOP
        elif last_allowed:
            self.finish_reason = FinishReason.LENGTH

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def delta(self) -> str:
        """Text not streamed yet that is safe to stream now (all of it once finished)."""
        if self.finished:
            final = self.final_text()
            if not final.startswith(self._streamed):
                return ""  # a tokenizer that rewrites earlier text: the stored text wins
            out = final[len(self._streamed) :]
        else:
            ready = len(self._text) - self._holdback
            if self._text.endswith(_INCOMPLETE):
                ready = min(ready, len(self._text) - 1)
            if ready <= len(self._streamed) or not self._text.startswith(self._streamed):
                return ""
            out = self._text[len(self._streamed) : ready]
        self._streamed += out
        return out

    def delta_logprobs(self) -> list[TokenLogprob]:
        """The logprob entries whose text the deltas so far released in full (all that are
        left once finished); call after `delta`."""
        end = len(self.logprobs)
        if not self.finished:
            end = self._released
            while end < len(self._ends) and self._ends[end] <= len(self._streamed):
                end += 1
        out = self.logprobs[self._released : end]
        self._released = end
        return out

    def final_text(self) -> str:
        if not self._stops:
            self._text = self._decode()
        return self._text

    def _decode(self) -> str:
        return str(self._tok.decode(self.ids, skip_special_tokens=True))
