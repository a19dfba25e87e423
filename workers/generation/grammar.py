"""Response formats enforced while decoding, one llguidance matcher per row.

Why llguidance (bench/README.md, C1): no dependencies of its own, grammars ready in a
millisecond or two (so a constrained request joining a running decode group does not
stall it), about 0.1 ms per token on a 49k vocabulary on CPU, the widest JSON Schema
support of the libraries measured, and a matcher per sequence, so a row's constraint
is its own and the other rows of the batch are untouched.

`Grammars` belongs to one loaded model (its tokenizer and vocabulary): it builds
llguidance's tokenizer once (a few seconds for a 49k vocabulary, on the first
constrained request) and a matcher per schema once; every row then starts from a copy
of that compiled matcher.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, cast

import llguidance
import llguidance.hf
import torch

from core.response_format import JSON_GRAMMAR_OPTIONS

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 64
JSON_OPTIONS = cast("JsonCompileOptions", JSON_GRAMMAR_OPTIONS)  # see core.response_format


class GrammarError(ValueError):
    """A schema the grammar library refused (the spec checker lets few through)."""


class RowMatcher:
    """One row's grammar state: the tokens it may choose next, and the ones it chose."""

    def __init__(self, matcher: Any, fallback_id: int) -> None:
        self._matcher = matcher
        self._fallback = fallback_id

    def allowed(self, vocab_size: int) -> torch.Tensor:
        # One byte per token (0 or 200). Not llguidance.torch: it torch.compiles at import.
        bias = self._matcher.compute_logit_bias()
        allowed = torch.frombuffer(bytearray(bias), dtype=torch.uint8)[:vocab_size] != 0
        if len(allowed) < vocab_size:  # model rows past the tokenizer's vocabulary
            allowed = torch.cat([allowed, allowed.new_zeros(vocab_size - len(allowed))])
        if not bool(allowed.any()):
            # A grammar with no way on (llguidance reports an error): end the row cleanly.
            logger.warning("grammar allows no token: %s", self._matcher.get_error())
            allowed[self._fallback] = True
        return allowed

    def accept(self, token_id: int) -> bool:
        if not self._matcher.consume_token(token_id):
            logger.warning("grammar refused token %d: %s", token_id, self._matcher.get_error())
            return True
        return bool(self._matcher.is_stopped())


class Grammars:
    """Compiled response-format grammars for one model's tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int], pad_id: int):
        self._hf = tokenizer
        self._vocab = vocab_size
        # A model without an end-of-text token ends a complete-but-extendable output (a
        # top-level number) with the pad token, which the text decoding drops.
        self._stop_ids = sorted(eos_ids) or [pad_id]
        self._tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _lltokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf, n_vocab=self._vocab, eos_token=self._stop_ids
            )
        return self._tokenizer

    def matcher(self, schema: dict[str, Any]) -> RowMatcher:
        """A fresh matcher for `schema` (compiled the first time this model sees it)."""
        key = json.dumps(schema, separators=(",", ":"))  # key order matters to the grammar
        with self._lock:
            template = self._compiled.get(key)
            if template is None:
                template = self._compile(schema)
                self._compiled[key] = template
                while len(self._compiled) > MAX_CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(key)
            return RowMatcher(template.deep_copy(), self._stop_ids[0])

    @property
    def cached(self) -> int:
        return len(self._compiled)

    def _compile(self, schema: dict[str, Any]) -> Any:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides=JSON_OPTIONS
            )
            matcher = llguidance.LLMatcher(self._lltokenizer(), grammar, log_level=0)
        except ValueError as exc:
            raise GrammarError(f"response_format cannot be enforced: {exc}") from exc
        if matcher.is_error():
            raise GrammarError(f"response_format cannot be enforced: {matcher.get_error()}")
        logger.info("grammar compiled for a %d-byte schema", len(grammar))
        return matcher
