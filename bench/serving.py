"""P6: streaming chat completions through the API vs the same requests on the engine in
this process.

SmolLM2-135M-Instruct (or the tiny GPT-2 with --quick), 32 different short questions,
64 new tokens each, greedy, measured side by side in one run, alternating `--rounds`
times:

  A  32 concurrent `POST /v1/chat/completions` with `stream: true` (sent by aiohttp, or
     httpx with `--client httpx`) on a private stack
     (SQLite, Redis, the API, one worker with MODELYARD_GENERATION_MAX_SEQUENCES=32):
     each request a job that joins the worker's decode group; time to first token is
     from sending the request to its first content chunk;
  B  the same 32 generation specs (built by the API's own request mapping) added at
     once to a TransformersEngine in this process and stepped until done; time to first
     token is from the start to the request's first text delta.

Throughput is completion tokens per second of wall time (A: the usage chunks; B: the
engine's outputs). For A it also prints when the requests' jobs were created (by the API)
and claimed (by the worker), as p50 after sending, read from the stack's database: where the
API's time to first token goes, before the engine's first step.

    python -m bench.serving [--rounds 2] [--quick] [--client aiohttp|httpx] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from sqlalchemy import select

from api.serving_requests import chat_request
from bench.common import auth_headers, percentile, private_stack, process_tree_cpu_s
from bench.generation import DEFAULT_CACHE, SMOL, TINY, install_model, prepare_smol
from bench.overhead import stack_pids
from core.heap import freeze_startup_objects
from core.settings import Settings
from db.models import Job
from db.session import session_scope
from tests.support.tiny_model import build_tiny_gpt2, with_chat_template
from workers.generation.engine import base_of, open_engine
from workers.generation.requests import GenerationRequest

REQUESTS = 32
NEW_TOKENS = 64
TOPICS = [
    "bread",
    "coffee",
    "a parcel",
    "running shoes",
    "a blue mug",
    "a refund",
    "the weather",
    "a cookbook",
    "a tent",
    "a backpack",
    "tea",
    "a bicycle",
    "a library",
    "a garden",
    "a train ticket",
    "an umbrella",
    "a lamp",
    "a chair",
    "a phone",
    "a laptop",
    "a guitar",
    "a camera",
    "a clock",
    "a kettle",
    "a pan",
    "a knife",
    "a map",
    "a hat",
    "a scarf",
    "a wallet",
    "a bottle",
    "a notebook",
]
QUESTIONS = [f"Tell me about {topic} in two sentences." for topic in TOPICS]


def body(model: str, question: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass(frozen=True)
class Run:
    seconds: float
    tokens: int
    ttft_s: list[float]
    created_s: list[float] = field(default_factory=list)  # A: each job's created_at - sent
    claimed_s: list[float] = field(default_factory=list)  # A: each job's started_at - sent

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class _Stream:
    """Reads one streamed answer: (time to first content chunk, completion tokens)."""

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.first = 0.0
        self.tokens = 0

    def line(self, line: str) -> None:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
        if not self.first and any(c["delta"].get("content") for c in chunk["choices"]):
            self.first = time.perf_counter() - self.sent
        if chunk.get("usage"):
            self.tokens = chunk["usage"]["completion_tokens"]


async def _one_aiohttp(
    http: aiohttp.ClientSession, payload: dict[str, Any]
) -> tuple[float, int, float]:
    """(time to first content chunk, completion tokens, end) of one streamed request."""
    stream = _Stream(time.perf_counter())
    async with http.post("/v1/chat/completions", json=payload) as resp:
        resp.raise_for_status()
        async for raw in resp.content:  # one line at a time
            stream.line(raw.decode().rstrip("\r\n"))
    return stream.first, stream.tokens, time.perf_counter()


async def _one_httpx(http: httpx.AsyncClient, payload: dict[str, Any]) -> tuple[float, int, float]:
    stream = _Stream(time.perf_counter())
    async with http.stream("POST", "/v1/chat/completions", json=payload) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            stream.line(line)
    return stream.first, stream.tokens, time.perf_counter()


def job_times(database_url: str, sent: datetime) -> tuple[list[float], list[float]]:
    """Seconds from `sent` to the created_at and to the started_at (claim) of every job
    created since."""
    with session_scope(database_url, readonly=True) as session:
        rows = session.execute(
            select(Job.created_at, Job.started_at).where(Job.created_at >= sent)
        ).all()
    created = [(row.created_at - sent).total_seconds() for row in rows]
    claimed = [(row.started_at - sent).total_seconds() for row in rows if row.started_at]
    return created, claimed


async def through_api(
    base: str, model: str, client: str = "aiohttp", database_url: str | None = None
) -> Run:
    """A: every question as its own streamed chat completion, all sent at once, by
    aiohttp (as vLLM's serving benchmark sends its load) or httpx (the openai SDK's
    client, which costs this process about 10x the CPU per request: see bench/README.md).
    With `database_url`, the run also has its jobs' creation and claim times."""
    payloads = [body(model, q) for q in QUESTIONS]
    sent = datetime.now(UTC)
    if client == "httpx":
        limits = httpx.Limits(max_connections=REQUESTS + 4)
        async with httpx.AsyncClient(
            base_url=base, headers=auth_headers(), timeout=600, limits=limits
        ) as http:
            start = time.perf_counter()
            results = await asyncio.gather(*(_one_httpx(http, p) for p in payloads))
    else:
        async with aiohttp.ClientSession(
            base,
            headers=auth_headers(),
            timeout=aiohttp.ClientTimeout(total=600),
            connector=aiohttp.TCPConnector(limit=REQUESTS + 4),
        ) as session:
            start = time.perf_counter()
            results = await asyncio.gather(*(_one_aiohttp(session, p) for p in payloads))
    end = max(r[2] for r in results)
    created, claimed = job_times(database_url, sent) if database_url else ([], [])
    return Run(end - start, sum(r[1] for r in results), [r[0] for r in results], created, claimed)


class InProcess:
    """B: the same specs on a TransformersEngine in this process."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.settings = settings
        self.specs = [
            chat_request(body(model, q), settings.chat_default_max_tokens).job.spec
            for q in QUESTIONS
        ]
        self.model = model

    def run(self) -> Run:
        base, _ = base_of(self.settings, self.model)
        engine, _ = open_engine(self.settings, "cpu", base)
        start = time.perf_counter()
        first: dict[str, float] = {}
        for i, spec in enumerate(self.specs):
            engine.add(GenerationRequest(key=str(i), spec=spec, stream=True))
        tokens = 0
        while engine.has_work:
            out = engine.step()
            now = time.perf_counter() - start
            for delta in out.deltas:
                first.setdefault(delta.key, now)
            for done in out.finished:
                tokens += sum(t.completion_tokens for t in done.texts)
            if out.failed:
                raise RuntimeError(out.failed[0].error)
        seconds = time.perf_counter() - start
        engine.close()
        return Run(seconds, tokens, [first.get(str(i), seconds) for i in range(len(self.specs))])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 round on the tiny GPT-2")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--client", choices=["aiohttp", "httpx"], default="aiohttp", help="A's HTTP client"
    )
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    started = time.perf_counter()
    a: list[Run] = []
    b: list[Run] = []
    cpu_ms: dict[str, list[float]] = {}  # A: CPU ms per request of each process of the stack
    with private_stack(generation_max_sequences=str(REQUESTS)) as (stack, base):
        models = stack.settings.models_dir
        if args.quick:
            model = "tiny-gpt2-chat"
            with_chat_template(build_tiny_gpt2(models / TINY), models / model)
        else:
            install_model(prepare_smol(args.cache_dir), models / SMOL)
            model = SMOL
        stack.start_worker()
        local = InProcess(stack.settings, model)
        local.run()  # warm-up: the worker's model is warmed by the first request below
        asyncio.run(through_api(base, model, args.client))
        # as the API and the worker do once ready: the in-process engine and the client
        # of A, both in this process, are then not paused by full collections either
        freeze_startup_objects("bench")
        sides = {name: stack_pids(stack, name) for name in ("api", "worker", "redis")}
        for _ in range(rounds):
            before = {name: process_tree_cpu_s(pids) for name, pids in sides.items()}
            a.append(
                asyncio.run(through_api(base, model, args.client, stack.settings.database_url))
            )
            for name, pids in sides.items():
                spent = process_tree_cpu_s(pids) - before[name]
                cpu_ms.setdefault(name, []).append(spent * 1000 / REQUESTS)
            b.append(local.run())
    result = summarize(a, b, model, time.perf_counter() - started)
    result["api_cpu_ms_per_request"] = {
        name: round(statistics.median(values), 2) for name, values in cpu_ms.items()
    }
    result["client"] = args.client
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def summarize(a: list[Run], b: list[Run], model: str, seconds: float) -> dict[str, Any]:
    ratios = [x.tokens_per_s / y.tokens_per_s for x, y in zip(a, b, strict=True)]
    ttft_a = [t for r in a for t in r.ttft_s]
    ttft_b = [t for r in b for t in r.ttft_s]
    return {
        "model": model,
        "requests": REQUESTS,
        "new_tokens": NEW_TOKENS,
        "rounds": len(a),
        "api_tokens_per_s": [round(r.tokens_per_s, 1) for r in a],
        "engine_tokens_per_s": [round(r.tokens_per_s, 1) for r in b],
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "api_ttft_p50_ms": _p50_ms(ttft_a),
        "engine_ttft_p50_ms": _p50_ms(ttft_b),
        "ttft_overhead_p50_ms": round((percentile(ttft_a, 50) - percentile(ttft_b, 50)) * 1000, 1),
        "api_ttft_p99_ms": round(percentile(ttft_a, 99) * 1000, 1),
        "api_created_p50_ms": _p50_ms([t for r in a for t in r.created_s]),
        "api_claimed_p50_ms": _p50_ms([t for r in a for t in r.claimed_s]),
        "api_ttft_p50_ms_by_round": [_p50_ms(r.ttft_s) for r in a],
        "engine_ttft_p50_ms_by_round": [_p50_ms(r.ttft_s) for r in b],
        "seconds": round(seconds, 1),
    }


def _p50_ms(values: list[float]) -> float | None:
    return round(percentile(values, 50) * 1000, 1) if values else None


def print_table(r: dict[str, Any]) -> None:
    print(f"P6 ({r['model']}, {r['requests']} streams x {r['new_tokens']} tokens)")
    print(
        f"  tokens/s API {r['api_tokens_per_s']} vs engine {r['engine_tokens_per_s']}: "
        f"ratio {r['ratio']}"
    )
    print(
        f"  time to first token p50: API {r['api_ttft_p50_ms']} ms, engine "
        f"{r['engine_ttft_p50_ms']} ms, overhead {r['ttft_overhead_p50_ms']} ms"
    )
    print(
        f"  the API's jobs, p50 after sending: created {r['api_created_p50_ms']} ms, claimed "
        f"by the worker {r['api_claimed_p50_ms']} ms"
    )
    cpu = r.get("api_cpu_ms_per_request")
    if cpu:
        print(
            "  CPU ms per request (median of rounds): "
            + ", ".join(f"{name} {value}" for name, value in cpu.items())
        )


def table_rows(r: dict[str, Any], row: Any) -> list[Any]:
    return [
        row(
            "P6",
            f"{r['requests']} streamed chat completions via API vs in-process engine, tokens/s",
            f"{r['ratio']:.2f}",
            ">= 0.8",
            r["ratio"] >= 0.8,
        ),
        row(
            "P6",
            "time to first token p50, API minus engine",
            f"{r['ttft_overhead_p50_ms']:.0f} ms",
            "<= 50 ms",
            r["ttft_overhead_p50_ms"] <= 50,
        ),
    ]


if __name__ == "__main__":
    main()
