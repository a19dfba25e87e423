"""Fault 2 of issue 16: two recovery leaders at once (reconciler, webhook sender, retry
publisher in two processes, as at a hand-over whose old leader has not noticed yet) for a
while, against 200 webhook deliveries, one in five to a slow endpoint, and the 200
unpublished jobs they belong to. Every delivery reaches its endpoint once, every job runs
once: the attempts are taken and recorded with compare-and-set, the claim is one too.

tests/faults/test_webhook_faults.py runs it; bench/faults.py puts it in the table."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from db.models import DEFAULT_TENANT
from tests.faults import overlapping_leader
from tests.faults.scenarios import Lab, Outcome, ended
from tests.support.faults import Figures
from tests.support.harness import Proc, wait_for
from tests.support.webhooks import Receiver, deliveries, give_secret, rows

ROOT = Path(__file__).resolve().parents[2]


def _overlapping_leader(lab: Lab, n: int, seconds: float) -> Proc:
    path = lab.stack.env.get("PYTHONPATH")
    env = {
        **lab.stack.env,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
        "MODELYARD_WEBHOOK_ALLOWED_DESTINATIONS": json.dumps(["127.0.0.0/8"]),
    }
    argv = [sys.executable, "-m", "tests.faults.overlapping_leader", str(seconds)]
    return Proc(f"leader-{n}", argv, env, lab.stack.workdir / f"overlapping-leader-{n}.log")


def two_leaders_at_once(
    lab: Lab, seconds: float = 10.0, count: int = 200, slow_s: float = 0.5
) -> Outcome:
    """The lab's own recovery is stopped (no beat; one worker that does not run for the
    lease), then two overlapping leaders run for `seconds` while 200 deliveries are due."""
    lab.stop_recovery()
    lab.special_worker(recovery_in_workers="false")
    fast, slow = Receiver(), Receiver(delay_s=slow_s)
    try:
        # the lab's key is the default tenant's: it reads the jobs through the API
        tenant = give_secret(lab.database_url, DEFAULT_TENANT)
        targets = [slow.url if n % 5 == 0 else fast.url for n in range(count)]
        ids = deliveries(lab.database_url, tenant, targets)
        leaders = [_overlapping_leader(lab, n, seconds) for n in (1, 2)]
        for proc in leaders:
            wait_for(lambda p=proc: not p.alive(), seconds + 60, f"{proc.name} to finish")  # type: ignore[misc]
        ran_to_the_end = [overlapping_leader.DONE in p.log.read_text() for p in leaders]
        for proc in leaders:
            proc.stop()
        received = fast.ids() + slow.ids()
    finally:
        fast.close()
        slow.close()
    lab.stack.start_beat()  # the lab's own recovery again, for what the leaders left
    found_rows = rows(lab.database_url, ids)
    jobs = [r.job_id for r in found_rows.values()]
    lab.settle(jobs, 120)
    found = lab.audit(jobs)
    delivered = sum(r.status == "delivered" for r in found_rows.values())
    twice = sum(n - 1 for n in received.values() if n > 1)
    undelivered = count - len(set(received) & set(ids))
    figures = Figures.of(
        f"22. two recovery leaders at once for {seconds:g}s, {count} webhook deliveries"
        f" (1 in 5 to a {slow_s:g}s endpoint) and their {count} unpublished jobs",
        found,
        note=f"delivered {delivered}, received twice {twice}; jobs {ended(found)}",
    )
    figures.lost += undelivered
    figures.duplicate_effects += twice
    return Outcome(
        figures,
        found,
        {
            "received": received,
            "ids": ids,
            "rows": {i: (r.status, r.attempts) for i, r in found_rows.items()},
            "ran_to_the_end": ran_to_the_end,
            "logs": "\n".join(p.tail(30) for p in leaders),
        },
    )
