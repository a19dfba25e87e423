"""Fault 6 of issue 16: quotas under concurrency and liveness beside capped tenants."""

from __future__ import annotations

import time

from tests.faults.guard_scenarios import concurrent_posts_against_quota, tenant_key
from tests.faults.scenarios import Lab
from tests.support.auth import bearer
from tests.support.harness import wait_for


def test_fifty_concurrent_posts_against_a_queued_quota_of_ten(lab: Lab) -> None:
    codes = concurrent_posts_against_quota(lab, posts=50, quota=10)
    assert codes.count(202) == 10, codes
    assert set(codes) == {202, 429}, codes


def test_idle_worker_beside_a_capped_tenant_backlog_passes_liveness(lab: Lab) -> None:
    """A tenant at its running cap (1) with a backlog, and an idle second worker: the
    backlog is work no worker may take, so `modelyard workers --check` passes."""
    lab.fleet(2)
    key = tenant_key(lab, max_running_jobs=1)
    with lab.stack.client() as c:
        c.headers.update(bearer(key))
        jobs = [
            c.post("/v1/jobs", json={"kind": "noop", "spec": {"duration_s": 12}}).json()
            for _ in range(3)
        ]

    def statuses() -> list[str]:
        with lab.stack.client() as c:
            c.headers.update(bearer(key))
            return [c.get(f"/v1/jobs/{j['id']}").json()["status"] for j in jobs]

    wait_for(lambda: "running" in statuses(), 60, "one job running")
    time.sleep(3.0 + 2)  # FAULT_SETTINGS worker_stall_s 3: the backlog waited longer
    found = statuses()
    assert found.count("running") == 1 and found.count("queued") == 2, found
    code, output = lab.check_workers()
    assert code == 0, output
    with lab.stack.client() as c:  # leave the lab idle
        c.headers.update(bearer(key))
        for job in jobs:
            c.post(f"/v1/jobs/{job['id']}/cancel")
