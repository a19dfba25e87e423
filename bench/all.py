"""`make bench`: every benchmark in one run, then one table of ratios against the plain
alternative (each measured side by side in its own script; see bench/README.md).

    python -m bench.all [--quick] [--json PATH]

--quick shrinks every row (fewer jobs, repeats and rows of history) to check the
scripts run; its figures are not the ones to quote.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Row:
    row: str
    what: str
    value: str
    goal: str
    met: bool | None  # None: informational


def _stats_ratio(stats: Any) -> str:
    return f"{stats.median:.2f} [{stats.min:.2f}-{stats.max:.2f}]"


def _job_path_cpu(jobs: int) -> dict[str, Any]:
    """bench.job_path_cpu in a process of its own (it sets its settings through the
    environment, which this process's other rows must not see)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "parts.json"
        subprocess.run(
            [sys.executable, "-m", "bench.job_path_cpu", "--jobs", str(jobs), "--json", str(out)],
            check=True,
        )
        result: dict[str, Any] = json.loads(out.read_text())
    return result


def p1_rows(quick: bool) -> list[Row]:
    from bench import overhead

    r = overhead.main(["--jobs", "100" if quick else "300", "--repeats", "1" if quick else "2"])
    parts = _job_path_cpu(100 if quick else 500)
    return [
        Row(
            "P1",
            "no-op jobs/s vs raw Celery tasks/s (SQLite)",
            f"{r['jobs_per_s'].median:.0f} / {r['raw_tasks_per_s'].median:.0f} = "
            + _stats_ratio(r["ratio"]),
            ">= 0.5",
            r["ratio"].median >= 0.5,
        ),
        Row(
            "P1",
            "CPU ms per no-op job, API / workers / Redis / submitting client (aiohttp) "
            "(raw Celery: workers / Redis / publish)",
            " / ".join(
                f"{r['cpu_ms_per_job'][k].median:.2f}" for k in ("api", "worker", "redis", "client")
            )
            + " ("
            + " / ".join(
                f"{r['raw_cpu_ms_per_task'][k].median:.2f}" for k in ("worker", "redis", "publish")
            )
            + ")",
            "",
            None,
        ),
        Row(
            "P1",
            "CPU ms per no-op job in one process (no HTTP, no Celery): API create path / "
            "worker lifecycle",
            f"{parts['api_create_cpu_ms']:.2f} / {parts['worker_lifecycle_cpu_ms']:.2f}",
            "",
            None,
        ),
        Row(
            "P1",
            "submit latency at 32 clients, p50 / p99",
            f"{r['submit_p50_ms']:.0f} / {r['submit_p99_ms']:.0f} ms",
            "p99 <= 25 ms",
            r["submit_p99_ms"] <= 25,
        ),
        Row(
            "P1",
            "SQLite, 32 clients + 2 workers: refused submits / 'database is locked'",
            f"{r['submit_failures']} / {r['database_locked_in_logs']}",
            "0 / 0",
            r["submit_failures"] == 0 and r["database_locked_in_logs"] == 0,
        ),
    ]


def p2_p4_rows(quick: bool) -> list[Row]:
    from bench import generation

    r = generation.main(["--quick"] if quick else [])
    return generation.table_rows(r, Row)


def p3_rows(quick: bool) -> list[Row]:
    from bench import finetune_vs_trainer

    args = ["--repeats", "1"] + (
        ["--train", "120", "--val", "40", "--test", "100", "--epochs", "1"] if quick else []
    )
    r = finetune_vs_trainer.main(args)
    ratios = sorted(r["ratios"])
    plain_f1 = sorted(p["f1"] for p in r["plain"])[len(r["plain"]) // 2]
    job_f1 = sorted(j["f1"] for j in r["job"])[len(r["job"]) // 2]
    return [
        Row(
            "P3",
            "fine-tune job vs plain Trainer, train samples/s",
            f"{ratios[len(ratios) // 2]:.3f}x",
            ">= 0.95x",
            ratios[len(ratios) // 2] >= 0.95,
        ),
        Row(
            "P3",
            "entity micro F1, job minus plain",
            f"{(job_f1 - plain_f1) * 100:+.1f} pt",
            "within 1 pt",
            abs(job_f1 - plain_f1) <= 0.01,
        ),
        *q1_rows(r),
    ]


def q1_rows(r: dict[str, Any]) -> list[Row]:
    """Model quality, from the P3 run: a job given no hyperparameters vs the plain script
    with its fixed settings, both scored on the same held-out test sentences."""
    plain_f1 = sorted(p["test_f1"] for p in r["plain"])[len(r["plain"]) // 2]
    plain_wall = sorted(p["wall_s"] for p in r["plain"])[len(r["plain"]) // 2]
    default_job = r["default_job"]
    job_f1 = default_job["test_f1"]
    return [
        Row(
            "Q1",
            f"entity micro F1 on {r['sentences']['test']} held-out sentences, job with "
            "default hyperparameters vs plain Trainer script (its fixed settings)",
            f"{job_f1:.3f} vs {plain_f1:.3f} ({(job_f1 - plain_f1) * 100:+.1f} pt)",
            "job > plain",
            job_f1 > plain_f1,
        ),
        Row(
            "Q1",
            "wall clock, job with default hyperparameters / plain script",
            f"{default_job['wall_s']:.0f} s ({default_job['steps']} steps) / {plain_wall:.0f} s",
            "",
            None,
        ),
    ]


def p5_rows(quick: bool) -> list[Row]:
    from bench import history

    args = ["--big", "10000", "--repeats", "50"] if quick else ["--repeats", "100"]
    r = history.main(args)
    ratios = {k: r["big"][k] / r["small"][k] for k in r["small"]}
    worst = max(ratios, key=lambda k: ratios[k])
    small, big = r["jobs"]
    return [
        Row(
            "P5",
            f"PostgreSQL {big:,} vs {small:,} jobs: worst p50 ratio ({worst})",
            f"{ratios[worst]:.2f}",
            "<= 2",
            ratios[worst] <= 2,
        )
    ]


def p6_rows(quick: bool) -> list[Row]:
    from bench import serving

    r = serving.main(["--quick"] if quick else [])
    return serving.table_rows(r, Row)


def packing_rows(quick: bool) -> list[Row]:
    from bench import packing

    r = packing.main(["--rows", "600", "--pairs", "1"] if quick else [])
    return packing.table_rows(r, Row)


SECTIONS: list[tuple[str, Callable[[bool], list[Row]]]] = [
    ("P1 overhead", p1_rows),
    ("P2/P4 generation", p2_p4_rows),
    ("P3/Q1 fine-tuning", p3_rows),
    ("P5 history", p5_rows),
    ("P6 serving", p6_rows),
    ("packing", packing_rows),
]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows: list[Row] = []
    started = time.perf_counter()
    took: dict[str, float] = {}
    for name, section in SECTIONS:
        t0 = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        rows.extend(section(args.quick))
        took[name] = time.perf_counter() - t0
    total = time.perf_counter() - started
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, " + (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    )
    print(f"\nModelyard benchmarks, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine}")
    print(f"({'quick run' if args.quick else 'full run'} in {total / 60:.1f} min)\n")
    print("| row | measure | value | goal | met |\n|---|---|---|---|---|")
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        print(f"| {r.row} | {r.what} | {r.value} | {r.goal} | {met} |")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"rows": [asdict(r) for r in rows], "seconds": took}, indent=2)
        )
    return rows


if __name__ == "__main__":
    main()
