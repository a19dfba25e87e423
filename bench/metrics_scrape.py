"""P7: the cost of a `/metrics` scrape with a big job history, on SQLite and PostgreSQL.

Fills a fresh database with N finished jobs (plus a few queued and running), then times
a scrape that reads everything (what one every `metrics_history_refresh_s` costs), one
that reads only the live figures (counts, queues, throughput, workers: every other
scrape past `metrics_cache_s`), and one answered from the copy. Goal: a scrape every 5 s
stays a small fraction of one core.

    python -m bench.metrics_scrape [--jobs 100000] [--admin-url postgresql://...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from prometheus_client import CollectorRegistry
from sqlalchemy import insert

from api.prometheus import ModelyardCollector
from api.routes.metrics import ScrapeCache
from core.settings import Settings
from db.models import Job
from db.session import migrate, session_scope

ROUNDS = 5


def fill(url: str, jobs: int) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    kinds = ("noop", "generate", "finetune", "predict")
    rows = []
    for i in range(jobs):
        t = start + timedelta(seconds=i)
        status = "queued" if i < 10 else "running" if i < 14 else "succeeded"
        rows.append(
            {
                "id": f"job_{uuid.uuid4().hex}",
                "kind": kinds[i % 4],
                "status": status,
                "spec": {},
                "priority": 0,
                "metadata_": {},
                "attempts": 1,
                "max_attempts": 3,
                "cancel_requested": False,
                "progress": 1.0,
                "created_at": t,
                "updated_at": t,
                "queued_at": t,
                "available_at": t,
                "started_at": None if status == "queued" else t + timedelta(seconds=2),
                "finished_at": t + timedelta(seconds=30) if status == "succeeded" else None,
                "tenant_id": "default",
                "progress_detail": {"samples_per_s": 10.0} if status == "running" else None,
            }
        )
    for chunk in range(0, len(rows), 5000):
        with session_scope(url) as s:
            s.execute(insert(Job), rows[chunk : chunk + 5000])


def _median_s(cache: ScrapeCache, max_age_s: float, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        cache.get(max_age_s)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cache(url: str, history_refresh_s: float) -> ScrapeCache:
    settings = Settings(
        database_url=url,
        broker_url="redis://127.0.0.1:6379/15",
        metrics_history_refresh_s=history_refresh_s,
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ModelyardCollector(settings))
    return ScrapeCache(registry)


def measure(url: str, jobs: int) -> tuple[float, float, float]:
    """Median seconds of: a scrape reading everything, one reading only the live figures
    (the history read within its refresh period), one answered from the copy."""
    migrate(url)
    fill(url, jobs)
    full = _median_s(_cache(url, 0), 0, ROUNDS)
    live_cache = _cache(url, 3600)
    live_cache.get(0)  # reads the history once
    live = _median_s(live_cache, 0, ROUNDS)
    cached = _median_s(live_cache, 3600, ROUNDS * 20)
    return full, live, cached


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = f"sqlite:///{Path(tmp) / 'metrics.db'}"
        results.append(("SQLite", *measure(sqlite, args.jobs)))
    name = f"bench_metrics_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        base = args.admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        results.append(("PostgreSQL", *measure(f"{base}/{name}", args.jobs)))
    finally:
        from db.session import get_engine

        get_engine(f"{base}/{name}").dispose()
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(
        f"| row | backend ({args.jobs:,} jobs) | full scrape | live figures only "
        "| from the copy | a core's share, one scrape per 5 s (full / live) |"
    )
    print("|---|---|---|---|---|---|")
    for backend, full, live, cached in results:
        print(
            f"| P7 | {backend} | {full * 1000:.0f} ms | {live * 1000:.1f} ms | "
            f"{cached * 1e6:.0f} us | {full / 5 * 100:.1f}% / {live / 5 * 100:.2f}% |"
        )


if __name__ == "__main__":
    main()
