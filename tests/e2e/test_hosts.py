"""Issue 18: workers on several hosts (network namespaces on this machine, tests/support/
netns.py), the database, Redis, the API and beat on a control host, all over HTTP and TCP
between the hosts. A worker host cut off mid job loses it to another host, and once back
its late writes are refused and it takes new work."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.harness import TERMINAL
from tests.support.hosts_stack import SHORT_LEASES, HostsStack, hosts_stack
from tests.support.netns import Hosts, hosts

pytestmark = [pytest.mark.e2e, pytest.mark.hosts, pytest.mark.slow]

SETTINGS = SHORT_LEASES


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hosts, HostsStack]]:
    workdir = tmp_path_factory.mktemp("hosts")
    with (
        hosts(2, workdir / "hosts") as made,
        hosts_stack(made, workdir / "logs", **SETTINGS) as stack,
    ):
        yield made, stack


@pytest.fixture
def lab(cluster: tuple[Hosts, HostsStack]) -> tuple[Hosts, HostsStack]:
    """Every worker host linked and running one live worker at the start of the test."""
    made, stack = cluster
    for host in made.workers:
        made.restore(host)
        if stack.worker_of(host) is None:
            stack.start_worker_on(host)
    return made, stack


def noop(stack: HostsStack, duration_s: float) -> str:
    with stack.client() as c:
        resp = c.post("/v1/jobs", json={"kind": "noop", "spec": {"duration_s": duration_s}})
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def claims(stack: HostsStack, job_id: str) -> list[str]:
    """The workers (host:pid) that claimed the job, in order."""
    return [
        e["data"]["worker"]
        for e in stack.events(job_id)
        if e["message"].startswith("claimed by") and "worker" in (e["data"] or {})
    ]


def test_two_worker_hosts_share_the_jobs(lab: tuple[Hosts, HostsStack]) -> None:
    made, stack = lab
    job_ids = [noop(stack, 0.3) for _ in range(8)]
    done = [stack.wait_status(job_id, TERMINAL, 60) for job_id in job_ids]
    assert [job["status"] for job in done] == ["succeeded"] * len(job_ids), done
    ran_on = {stack.host_named(claims(stack, job_id)[-1]).name for job_id in job_ids}
    assert ran_on == {host.name for host in made.workers}, ran_on


def test_a_cut_off_host_loses_its_job_and_comes_back_fenced(
    lab: tuple[Hosts, HostsStack],
) -> None:
    made, stack = lab
    job_id = noop(stack, 6.0)
    stack.wait_status(job_id, ("running",), 30)
    (first,) = claims(stack, job_id)
    victim = stack.host_named(first)
    survivor = next(h for h in made.workers if h is not victim)
    victim_worker = stack.worker_of(victim)
    assert victim_worker is not None
    with made.cut_off(victim):
        done = stack.wait_status(job_id, TERMINAL, 60)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2, done
        takeover = claims(stack, job_id)
        assert [stack.host_named(w) for w in takeover] == [victim, survivor], takeover
        settled = stack.events(job_id)
    # nothing of attempt 1 after attempt 2's claim (the cut-off host could not write)
    taken = max(i for i, e in enumerate(settled) if e["message"].startswith("claimed by"))
    named = {(e["data"] or {}).get(k) for e in settled[taken:] for k in ("worker", "by")}
    assert first not in named, settled[taken:]
    # Back on the network with the survivor's worker stopped, the victim takes the next job.
    # Its worker runs one job at a time, so by then the stale attempt has ended.
    survivor_worker = stack.worker_of(survivor)
    assert survivor_worker is not None
    survivor_worker.stop()
    stack.workers.remove(survivor_worker)
    later = noop(stack, 0.2)
    assert stack.wait_status(later, TERMINAL, 60)["status"] == "succeeded"
    assert [stack.host_named(w) for w in claims(stack, later)] == [victim]
    # The victim stopped its attempt itself, before its lease could run out (its lease
    # watchdog does not wait for the renewals stuck on the cut-off network); nothing it
    # tried to write after that reached the job.
    log = victim_worker.log.read_text(errors="replace")
    assert "stopping before it can run out" in log
    assert "attempt 1 stopped after losing its lease" in log
    after = stack.job(job_id)
    assert (after["status"], after["attempts"]) == ("succeeded", 2), after
    events = stack.events(job_id)
    assert events == settled, events[len(settled) :]


def test_redis_unreachable_from_the_workers_for_a_while(lab: tuple[Hosts, HostsStack]) -> None:
    _, stack = lab
    # 9 s: three lease TTLs (3 s), so a broker lease that Redis cannot renew runs out
    # several times over. The 30 s is fault row 27 (tests/faults/test_host_faults.py,
    # `python -m bench.faults --only redis_cut_from_workers`).
    outage_s = 9.0
    running = noop(stack, outage_s + 4)
    stack.wait_status(running, ("running",), 30)
    with stack.redis_blocked():
        queued = [noop(stack, 0.2) for _ in range(3)]
        time.sleep(outage_s)
        assert stack.job(running)["status"] == "running"
    done = [stack.wait_status(job_id, TERMINAL, 60) for job_id in [running, *queued]]
    assert [(j["status"], j["attempts"]) for j in done] == [("succeeded", 1)] * len(done), done
    assert [len(claims(stack, job_id)) for job_id in [running, *queued]] == [1] * len(done)
