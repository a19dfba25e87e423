"""P5: list and poll latency with a large history vs a small one, on PostgreSQL.

Fills a database with 1k jobs / 10k events, measures the API, grows it to 100k
jobs / 1M events (same 10 queued jobs, the rest finished), measures again, and
prints the p50 ratio per request (goal <= 2), plus the reconciler's time.

    python -m bench.history [--big 100000] [--events-per-job 10] [--admin-url URL]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
import uuid
from typing import Any

import httpx
import psycopg

from bench.common import auth_headers, percentile, private_stack
from core.dispatch import JobPublisher
from core.settings import Settings
from db.session import migrate
from workers.reconciler import reconcile

QUEUED = 10


def fill(url: str, start: int, stop: int, events_per_job: int) -> None:
    """Insert jobs start..stop-1 (all finished) and their events, in SQL."""
    with psycopg.connect(url) as conn:
        conn.execute(
            """
            INSERT INTO jobs (id, kind, status, spec, priority, metadata, attempts, max_attempts,
                cancel_requested, progress, created_at, updated_at, queued_at, available_at,
                started_at, finished_at, tenant_id)
            SELECT 'job_' || md5('bench' || i), 'noop', 'succeeded', '{}', 0,
                json_build_object('batch', 'b' || (i %% 100)), 1, 3, false, 1.0,
                timestamp '2026-01-01' + make_interval(secs => i),
                timestamp '2026-01-01' + make_interval(secs => i),
                timestamp '2026-01-01' + make_interval(secs => i),
                timestamp '2026-01-01' + make_interval(secs => i),
                timestamp '2026-01-01' + make_interval(secs => i),
                timestamp '2026-01-01' + make_interval(secs => i), 'default'
            FROM generate_series(%s::int, %s::int) AS i
            """,
            (start, stop - 1),
        )
        conn.execute(
            """
            INSERT INTO job_events (job_id, type, message, data, created_at)
            SELECT 'job_' || md5('bench' || i), 'status', 'event ' || e, '{}',
                timestamp '2026-01-01' + make_interval(secs => i)
            FROM generate_series(%s::int, %s::int) AS i, generate_series(1, %s::int) AS e
            """,
            (start, stop - 1, events_per_job),
        )
        conn.execute("ANALYZE")


def add_queued(base: str) -> list[str]:
    with httpx.Client(base_url=base, headers=auth_headers()) as http:
        return [http.post("/v1/jobs", json={"kind": "noop"}).json()["id"] for _ in range(QUEUED)]


def measure(base: str, sample_job: str, repeats: int) -> dict[str, float]:
    with httpx.Client(base_url=base, timeout=30, headers=auth_headers()) as http:
        middle = http.get("/v1/jobs", params={"limit": 100}).json()["next_cursor"]
        requests: dict[str, tuple[str, dict[str, Any]]] = {
            "list first page": ("/v1/jobs", {"limit": 20}),
            "list with cursor": ("/v1/jobs", {"limit": 20, "cursor": middle}),
            "list status=queued": ("/v1/jobs", {"status": "queued", "limit": 20}),
            "list metadata filter": ("/v1/jobs", {"metadata": "batch:b7", "limit": 20}),
            "poll a job": (f"/v1/jobs/{sample_job}", {}),
            "job events": (f"/v1/jobs/{sample_job}/events", {"limit": 100}),
        }
        out: dict[str, float] = {}
        for name, (path, params) in requests.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = http.get(path, params=params)
                times.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
            out[name] = percentile(times, 50) * 1000
    return out


def reconcile_ms(settings: Settings, repeats: int = 5) -> float:
    publisher = JobPublisher(settings)
    try:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            reconcile(settings, publisher)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000
    finally:
        publisher.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--events-per-job", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    name = f"modelyard_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(args.admin_url, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    raw_url = args.admin_url.rsplit("/", 1)[0] + f"/{name}"
    url = raw_url.replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        migrate(url)
        with private_stack(url) as (stack, base):
            settings = Settings(database_url=url, broker_url=stack.env["MODELYARD_BROKER_URL"])
            fill(raw_url, 1, args.small, args.events_per_job)
            queued = add_queued(base)
            sample = "job_" + hashlib.md5(b"bench7").hexdigest()
            small = measure(base, sample, args.repeats)
            small_rec = reconcile_ms(settings)
            t0 = time.perf_counter()
            fill(raw_url, args.small, args.big, args.events_per_job)
            fill_s = time.perf_counter() - t0
            big = measure(base, sample, args.repeats)
            big_rec = reconcile_ms(settings)
            assert len(queued) == QUEUED
    finally:
        from db.session import get_engine

        get_engine(url).dispose()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    print(
        f"P5 history on PostgreSQL: {args.small:,} vs {args.big:,} jobs, "
        f"{args.events_per_job} events each ({args.big * args.events_per_job:,} events; "
        f"filled in {fill_s:.0f}s), {QUEUED} queued; p50 of {args.repeats} requests"
    )
    print(f"  {'request':24}{'small ms':>10}{'big ms':>10}{'ratio':>8}  (goal <= 2)")
    for key in small:
        print(f"  {key:24}{small[key]:>10.2f}{big[key]:>10.2f}{big[key] / small[key]:>8.2f}")
    print(f"  {'reconciler pass':24}{small_rec:>10.2f}{big_rec:>10.2f}{big_rec / small_rec:>8.2f}")
    return {
        "small": {**small, "reconciler pass": small_rec},
        "big": {**big, "reconciler pass": big_rec},
        "jobs": (args.small, args.big),
        "fill_s": fill_s,
    }


if __name__ == "__main__":
    main()
