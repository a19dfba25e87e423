"""Fault 5 of issue 16: workers whose clocks are minutes off. Leases are written and
judged by the database's clock, so a worker behind keeps its live jobs and a dead worker
ahead does not keep its jobs past lease TTL + reconcile period.

The skewed workers run under libfaketime (`faketime` package: LD_PRELOAD with FAKETIME),
which shifts every wall-clock read of the process (time.time, datetime.now) and leaves
the monotonic clock alone, as a host whose clock is wrong would."""

from __future__ import annotations

from pathlib import Path

from tests.faults.scenarios import Lab, Outcome, ended, now, seconds
from tests.support.faults import Figures, claimed_at
from tests.support.harness import Proc
from tests.support.services import missing_service

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SKEW = {"ahead": "+5m", "behind": "-5m"}


def skewed_worker(lab: Lab, skew: str) -> Proc:
    """A worker whose wall clock is `skew` (libfaketime's "+5m" / "-5m") off."""
    if not LIBFAKETIME.exists():
        missing_service("libfaketime (apt-get install faketime)")
    env = {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": skew,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }
    return lab.stack.start_worker(env=env)


def skewed_workers(lab: Lab, duration_s: float = 8.0) -> Outcome:
    """A job longer than the lease TTL on a worker 5 minutes behind (its lease, were it
    written by its own clock, would look expired to everyone else: the job would be taken
    away while it runs), then a job on a worker 5 minutes ahead that is killed -9 mid job
    (its lease would outlive it by 5 minutes: the job would sit `running` that long). Only
    skewed workers run the jobs; a plain one comes in after the kill to take the repair."""
    for proc in lab.fleet(0):
        proc.stop()
    behind = skewed_worker(lab, SKEW["behind"])
    live = lab.noop(duration_s)
    lab.wait(live["id"], ("running",), 60)
    live_done = lab.wait(live["id"], timeout=duration_s + 60)
    behind.stop()
    lab.stack.workers.remove(behind)
    ahead = skewed_worker(lab, SKEW["ahead"])
    dead = lab.noop(duration_s)
    lab.wait(dead["id"], ("running",), 60)
    killed = now()
    ahead.kill9()
    lab.deaths[ahead.identity] = killed
    lab.stack.workers.remove(ahead)
    lab.fleet(1)
    jobs = [live["id"], dead["id"]]
    done = lab.settle(jobs, 90)
    found = lab.audit(jobs)
    return Outcome(
        Figures.of(
            "21. workers 5 min behind (live job) and 5 min ahead (killed -9)",
            found,
            seconds(killed, claimed_at(lab.database_url, dead["id"], killed)),
            note=ended(found),
        ),
        found,
        {"live": live_done, "done": done, "jobs": jobs},
    )
