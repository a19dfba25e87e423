"""Fault injection report (issue 5): every scenario of tests/faults on this machine, against
a private redis-server, a private PostgreSQL cluster and real API, beat and worker
processes, as one table: jobs submitted, lost (accepted, never finished), stuck (of those,
the ones nothing will move: queued with a cancel asked, running past their lease),
concurrent duplicate executions (attempts of one job whose spans overlap), duplicate
effects (rows written twice), stale writes surviving (rows and files, on disk and in the
stack's file:// store, of an attempt that did not hold the job), steps redone, time to
recover. Rows 14-19 are the faults of issue 15. Rows 26-28 (`cut_off_host`,
`redis_cut_from_workers`, `cut_off_leader`) run on test hosts (tests/support/netns.py: root,
`ip` and `iptables` needed) in a stack of their own, after the others; row 27 keeps Redis
from the worker hosts for the issue's 30 s in either mode.

    python -m bench.faults [--quick] [--only NAME,...] [--json PATH]

Without --quick, Redis is unreachable for 30 s, PostgreSQL stopped (and, in the rows of
issue 16, black-holed) for 60 s and two recovery leaders overlap for 60 s, as the issues
ask; --quick uses 5 s, 8 s and 15 s. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.faults import (
    clock_scenarios,
    guard_scenarios,
    host_scenarios,
    leader_scenarios,
    message_scenarios,
    outage_scenarios,
    scenarios,
    training_scenarios,
    webhook_scenarios,
)
from tests.faults.scenarios import FAULT_SETTINGS, Lab, Outcome
from tests.support.faults import Figures
from tests.support.services import PostgresCluster, RedisServer
from tests.support.tiny_model import build_tiny_gpt2

COLUMNS = (
    "scenario",
    "jobs submitted",
    "lost",
    "stuck",
    "concurrent duplicate executions",
    "duplicate effects",
    "stale writes surviving",
    "steps redone",
    "time to recover (s)",
)


def _scenario_one(lab: Lab) -> Outcome:
    lab.fleet(2)
    return scenarios.kill_worker_mid_finetune(
        lab.stack, lab.database_url, lab.text_dataset(), steps=300, every=25
    )


def plan(quick: bool) -> list[tuple[str, Callable[[Lab], Outcome]]]:
    redis_down = 5.0 if quick else 30.0
    pg_down = 8.0 if quick else 60.0
    leaders_s = 15.0 if quick else 60.0
    return [
        ("kill_worker", _scenario_one),
        ("kill_pool_child", scenarios.kill_pool_child),
        ("visibility_timeout", scenarios.visibility_timeout),
        ("prefetch", scenarios.no_job_behind_busy_worker),
        ("redis_restart", lambda lab: scenarios.redis_restart_without_persistence(lab, 50)),
        ("redis_unreachable", lambda lab: scenarios.redis_unreachable(lab, redis_down)),
        ("postgres_down", lambda lab: scenarios.postgres_down_during_finetune(lab, pg_down)),
        ("out_of_memory", scenarios.out_of_memory),
        ("sigterm", scenarios.sigterm_mid_finetune),
        ("disk_full", scenarios.disk_full_on_checkpoint),
        ("cancel_restart", scenarios.cancel_then_restart_workers),
        ("idempotency", scenarios.concurrent_idempotent_posts),
        ("commit_lost", scenarios.commit_lost_at_finish),
        ("poison", scenarios.poison_job),
        ("expires_at", scenarios.queued_job_expires),
        ("max_runtime", scenarios.max_runtime_times_out),
        ("sigstop_finetune", scenarios.sigstop_past_lease_mid_finetune),
        ("sigstop_decode", scenarios.sigstop_past_lease_mid_decode),
        ("cancel_transient", scenarios.cancel_races_transient_error),
        ("cancel_sigterm", scenarios.cancel_races_sigterm),
        ("cancel_disk_full", scenarios.cancel_races_disk_full),
        ("cancel_after_claim", scenarios.cancel_just_after_claim),
        ("db_error_in_group", scenarios.db_error_in_decode_group),
        ("bad_adapter_in_group", scenarios.bad_adapter_in_decode_group),
        ("ignores_stop", scenarios.runner_ignores_stop),
        ("never_published", message_scenarios.crash_between_commit_and_publish),
        ("killed_before_claim", message_scenarios.consumer_killed_before_claim),
        ("aof_everysec", message_scenarios.aof_everysec_loses_the_push),
        ("kill_leader", leader_scenarios.kill_recovery_leader),
        ("clock_skew", clock_scenarios.skewed_workers),
        (
            "pg_stopped_past_retries",
            lambda lab: outage_scenarios.postgres_outage(lab, "stopped", pg_down),
        ),
        (
            "pg_blackholed_past_retries",
            lambda lab: outage_scenarios.postgres_outage(lab, "blackholed", pg_down),
        ),
        ("rebinding", guard_scenarios.rebinding_webhook_destination),
        ("capped_liveness", guard_scenarios.capped_tenant_liveness),
        ("quota_posts", guard_scenarios.concurrent_posts_against_quota),
        (
            "two_leaders",
            lambda lab: webhook_scenarios.two_leaders_at_once(lab, leaders_s, slow_s=1.0),
        ),
        ("kill_training_process", training_scenarios.kill_one_training_process),
    ]


# Scenarios on test hosts (network namespaces: root and `ip`), each in a lab of its own.
HOST_PLAN: list[tuple[str, Callable[[host_scenarios.HostsLab], Outcome]]] = [
    ("cut_off_host", host_scenarios.cut_off_mid_finetune),
    ("cut_off_leader", host_scenarios.cut_off_recovery_leader),
    ("redis_cut_from_workers", host_scenarios.redis_cut_from_workers),
]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def table(rows: list[Figures]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for f in rows:
        cells = [
            f.scenario + (f" ({f.note})" if f.note else ""),
            f.submitted,
            f.lost,
            f.stuck,
            f.concurrent,
            f.duplicate_effects,
            f.stale_writes,
            f.steps_redone,
            f.recover_s,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _measure(rows: list[Figures], name: str, scenario: Callable[[Any], Outcome], lab: Any) -> None:
    started = time.monotonic()
    try:
        outcome = scenario(lab)
        rows.append(outcome.figures)
    except Exception as exc:
        traceback.print_exc()
        rows.append(Figures(name, 0, -1, -1, -1, -1, -1, note=f"FAILED: {exc!r:.80}"))
    print(f"{name}: {time.monotonic() - started:.0f}s", flush=True)


def run(quick: bool, only: set[str] | None) -> list[Figures]:
    rows: list[Figures] = []
    chosen = [(n, s) for n, s in plan(quick) if not only or n in only]
    on_hosts = [(n, s) for n, s in HOST_PLAN if not only or n in only]
    with tempfile.TemporaryDirectory(prefix="modelyard-faults-") as tmp:
        root = Path(tmp)
        model = build_tiny_gpt2(root / "models" / "tiny-gpt2")
        if chosen:
            pg = PostgresCluster()
            broker = RedisServer(root / "redis")
            try:
                pg.init()
                pg.start()
                broker.start()
                with scenarios.lab_stack(
                    root / "stack", model, pg=pg, broker=broker, name="modelyard_bench_faults"
                ) as lab:
                    for name, scenario in chosen:
                        _measure(rows, name, scenario, lab)
            finally:
                broker.stop()
                pg.destroy()
        if on_hosts:
            with host_scenarios.hosts_lab(root / "hosts", model) as hosts_lab:
                for name, hosted in on_hosts:
                    _measure(rows, name, hosted, hosts_lab)
    return rows


def main(argv: list[str] | None = None) -> list[Figures]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the test suite's outage lengths")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    only = {n.strip() for n in args.only.split(",") if n.strip()} or None
    started = time.monotonic()
    rows = run(args.quick, only)
    bound = float(FAULT_SETTINGS["lease_ttl_s"]) + float(FAULT_SETTINGS["reconcile_period_s"])
    print()
    print(
        f"## Fault injection ({datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, "
        f"{platform.python_version()}, {'quick' if args.quick else 'full'} run, "
        f"{time.monotonic() - started:.0f}s)"
    )
    print()
    print(table(rows))
    print()
    print(
        f"Lease TTL {FAULT_SETTINGS['lease_ttl_s']} s, heartbeat "
        f"{FAULT_SETTINGS['heartbeat_interval_s']} s, reconcile period "
        f"{FAULT_SETTINGS['reconcile_period_s']} s: recovery bound (lease TTL + reconcile "
        f"period) {bound:g} s for lost workers."
    )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
