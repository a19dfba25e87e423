"""P1: no-op jobs through HTTP API + database + Redis + worker, vs raw Celery no-op tasks.

Both run side by side in one invocation, on the same private Redis, with two
consumer processes each (raw: prefork -c 2; Modelyard: two solo workers), and
are repeated alternately. Also measures API submit latency at 32 clients.

    python -m bench.overhead [--jobs 400] [--repeats 3] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import redis
from sqlalchemy import func, select

from bench.common import (
    Stats,
    auth_headers,
    percentile,
    private_stack,
    process_tree_cpu_s,
    wait_until,
)
from db.models import Job
from db.session import session_scope
from modelyard.stack import Stack


def stack_pids(stack: Stack, name: str) -> list[int]:
    return [proc.pid for pname, proc in stack.procs if pname == name]


def raw_celery_rate(
    broker_url: str, n: int, log: Path, redis_pids: list[int]
) -> tuple[float, dict[str, float]]:
    """Tasks/s, and CPU ms per task of the publishing thread, the worker processes
    (main and its prefork children) and Redis."""
    env = {**os.environ, "BENCH_BROKER_URL": broker_url}
    argv = [sys.executable, "-m", "celery", "-A", "bench.raw_app", "worker", "-P", "prefork"]
    argv += ["-c", "2", "-Q", "raw", "--without-mingle", "--without-gossip", "-l", "WARNING"]
    with log.open("ab") as fh:
        worker = subprocess.Popen(argv, env=env, stdout=fh, stderr=fh)
    counter = redis.Redis.from_url(broker_url)
    try:
        from bench.raw_app import app, noop

        app.conf.broker_url = broker_url
        counter.delete("raw:done")
        noop.delay(-1)  # wait until the worker consumes
        wait_until(lambda: int(counter.get("raw:done") or 0) >= 1, 60)
        counter.delete("raw:done")
        cpu_before = (process_tree_cpu_s([worker.pid]), process_tree_cpu_s(redis_pids))
        start = time.perf_counter()
        publish_cpu = time.thread_time()
        for i in range(n):
            noop.delay(i)
        publish_cpu = time.thread_time() - publish_cpu
        wait_until(lambda: int(counter.get("raw:done") or 0) >= n, 300, 0.005)
        rate = n / (time.perf_counter() - start)
        cpu_after = (process_tree_cpu_s([worker.pid]), process_tree_cpu_s(redis_pids))
        return rate, {
            "publish": publish_cpu * 1000 / n,
            "worker": (cpu_after[0] - cpu_before[0]) * 1000 / n,
            "redis": (cpu_after[1] - cpu_before[1]) * 1000 / n,
        }
    finally:
        worker.terminate()
        worker.wait(30)
        counter.close()


def submit_many(
    base: str, n: int, clients: int, failures: list[str] | None = None, client: str = "aiohttp"
) -> list[float]:
    """Submit n no-op jobs from `clients` concurrent clients; returns per-request latencies
    (s). `client`: aiohttp (one event loop, as bench.serving and vLLM's serving benchmark
    send load) or httpx (a thread per client; about four times the CPU per request in this
    process, which shares the machine's two cores with the stack: bench/README.md, P1).

    A refused submit raises, unless `failures` is given: then it is counted there.
    """
    latencies: list[float] = []
    per_client = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]

    def record(status: int, text: str, seconds: float) -> None:
        if status == 202:
            latencies.append(seconds)
        elif failures is None:
            raise RuntimeError(f"submit failed: {status} {text}")
        else:
            failures.append(f"{status} {text[:200]}")

    if client == "httpx":
        _submit_httpx(base, per_client, record)
    else:
        asyncio.run(_submit_aiohttp(base, per_client, record))
    return latencies


def _submit_httpx(
    base: str, per_client: list[int], record: Callable[[int, str, float], None]
) -> None:
    lock = threading.Lock()

    def client(count: int) -> None:
        with httpx.Client(base_url=base, timeout=30, headers=auth_headers()) as http:
            for _ in range(count):
                t0 = time.perf_counter()
                r = http.post("/v1/jobs", json={"kind": "noop"})
                dt = time.perf_counter() - t0
                with lock:
                    record(r.status_code, r.text, dt)

    with ThreadPoolExecutor(len(per_client)) as pool:
        list(pool.map(client, per_client))


async def _submit_aiohttp(
    base: str, per_client: list[int], record: Callable[[int, str, float], None]
) -> None:
    async with aiohttp.ClientSession(
        base,
        headers=auth_headers(),
        timeout=aiohttp.ClientTimeout(total=30),
        connector=aiohttp.TCPConnector(limit=len(per_client)),
    ) as http:

        async def client(count: int) -> None:
            for _ in range(count):
                t0 = time.perf_counter()
                async with http.post("/v1/jobs", json={"kind": "noop"}) as r:
                    text = await r.text()
                record(r.status, text, time.perf_counter() - t0)

        await asyncio.gather(*(client(count) for count in per_client))


def succeeded(database_url: str) -> int:
    with session_scope(database_url, readonly=True) as s:
        return s.scalar(select(func.count()).where(Job.status == "succeeded")) or 0


def modelyard_rate(
    stack: Stack, base: str, database_url: str, n: int, client: str = "aiohttp"
) -> tuple[float, dict[str, float]]:
    """Jobs/s, and CPU ms per job of the API process(es) (with uvicorn's server
    children), the two worker processes, Redis and the submitting client (this process's
    CPU while it submits: on the same two cores as the rest)."""
    groups = {name: stack_pids(stack, name) for name in ("api", "worker", "redis")}
    before = succeeded(database_url)
    cpu_before = {name: process_tree_cpu_s(pids) for name, pids in groups.items()}
    start = time.perf_counter()
    client_cpu = time.process_time()
    submit_many(base, n, clients=8, client=client)
    client_cpu = time.process_time() - client_cpu
    wait_until(lambda: succeeded(database_url) - before >= n, 300, 0.05)
    rate = n / (time.perf_counter() - start)
    # The workers' heartbeat and consumer threads keep using CPU while idle; reading right
    # after the last job finished keeps that share to what ran during the window.
    cpu = {
        name: (process_tree_cpu_s(pids) - cpu_before[name]) * 1000 / n
        for name, pids in groups.items()
    }
    cpu["client"] = client_cpu * 1000 / n
    return rate, cpu


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database-url", default="", help="default: SQLite in a temp dir")
    parser.add_argument("--api-workers", type=int, default=1, help="API server processes")
    parser.add_argument(
        "--client",
        choices=["aiohttp", "httpx"],
        default="aiohttp",
        help="the submitting HTTP client (httpx: a thread per client, ~4x its CPU)",
    )
    args = parser.parse_args(argv)

    with private_stack(
        args.database_url or None, reconcile_period_s="30", api_workers=str(args.api_workers)
    ) as (stack, base):
        database_url = stack.env["MODELYARD_DATABASE_URL"]
        broker = stack.env["MODELYARD_BROKER_URL"]
        assert stack.log_dir is not None
        stack.start_worker()
        stack.start_worker()
        httpx.post(
            f"{base}/v1/jobs", json={"kind": "noop"}, headers=auth_headers()
        )  # warm up workers and pools
        wait_until(lambda: succeeded(database_url) >= 1, 120)
        raw: list[float] = []
        ours: list[float] = []
        ours_cpu: dict[str, list[float]] = {"api": [], "worker": [], "redis": [], "client": []}
        raw_cpu: dict[str, list[float]] = {"publish": [], "worker": [], "redis": []}
        for _ in range(args.repeats):
            rate, cpu = modelyard_rate(stack, base, database_url, args.jobs, args.client)
            ours.append(rate)
            for name, value in cpu.items():
                ours_cpu[name].append(value)
            rate, cpu = raw_celery_rate(
                broker, args.jobs, stack.log_dir / "raw-celery.log", stack_pids(stack, "redis")
            )
            raw.append(rate)
            for name, value in cpu.items():
                raw_cpu[name].append(value)
        failures: list[str] = []
        latencies = submit_many(base, 32 * 20, clients=32, failures=failures, client=args.client)
        accepted = 1 + args.jobs * args.repeats + len(latencies)
        wait_until(lambda: succeeded(database_url) >= accepted, 300)
        locked = sum(
            log.read_text(errors="replace").count("database is locked")
            for log in stack.log_dir.glob("*.log")
        )
    result = {
        "backend": "postgresql" if "postgresql" in (args.database_url or "") else "sqlite",
        "api_workers": args.api_workers,
        "client": args.client,
        "raw_tasks_per_s": Stats(raw),
        "jobs_per_s": Stats(ours),
        "ratio": Stats([o / r for o, r in zip(ours, raw, strict=True)]),
        "cpu_ms_per_job": {name: Stats(values) for name, values in ours_cpu.items()},
        "raw_cpu_ms_per_task": {name: Stats(values) for name, values in raw_cpu.items()},
        "submit_p50_ms": percentile(latencies, 50) * 1000,
        "submit_p99_ms": percentile(latencies, 99) * 1000,
        "submit_failures": len(failures),
        "database_locked_in_logs": locked,
        "submit_rate_32_clients": len(latencies) / max(sum(latencies) / 32, 1e-9),
    }
    print_table(result)
    return result


def print_table(r: dict[str, Any]) -> None:
    print(
        f"P1 no-op overhead ({r['backend']}, {r['api_workers']} API process(es), "
        f"{r['client']} client), median [min-max] over repeats"
    )
    print(f"  raw Celery no-op tasks/s      {r['raw_tasks_per_s'].fmt()}")
    print(f"  Modelyard no-op jobs/s        {r['jobs_per_s'].fmt()}")
    print(f"  ratio (goal >= 0.5)           {r['ratio'].fmt(digits=2)}")
    ours, raw = r["cpu_ms_per_job"], r["raw_cpu_ms_per_task"]
    print(
        f"  CPU ms per job, Modelyard     API {ours['api'].fmt(digits=2)}, "
        f"workers {ours['worker'].fmt(digits=2)}, Redis {ours['redis'].fmt(digits=2)}; "
        f"the submitting client {ours['client'].fmt(digits=2)}"
    )
    print(
        f"  CPU ms per task, raw Celery   publish {raw['publish'].fmt(digits=2)}, "
        f"workers {raw['worker'].fmt(digits=2)}, Redis {raw['redis'].fmt(digits=2)}"
    )
    print(
        f"  submit latency, 32 clients    p50 {r['submit_p50_ms']:.1f} ms, "
        f"p99 {r['submit_p99_ms']:.1f} ms (goal p99 <= 25 ms), "
        f"~{r['submit_rate_32_clients']:.0f} submits/s"
    )
    print(
        f"  32 clients + 2 workers writing  {r['submit_failures']} refused submits, "
        f"{r['database_locked_in_logs']} 'database is locked' in the logs (goal 0)"
    )


if __name__ == "__main__":
    main()
