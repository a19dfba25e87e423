"""Fault scenarios of issue 16 about the recovery lease: the process that reconciles is
killed with repairs pending, and another one does them.

tests/faults/test_leader_faults.py runs them; bench/faults.py puts them in the table."""

from __future__ import annotations

from datetime import datetime

from core.enums import JobKind
from db.jobs import create_job
from db.leader import read_lease
from db.models import DEFAULT_TENANT
from db.session import session_scope
from tests.faults.scenarios import Lab, Outcome, ended, now, seconds
from tests.support.faults import Figures, claimed_at
from tests.support.harness import Proc, wait_for
from workers.leader import RECOVERY_LEASE


def recovery_leader(database_url: str) -> tuple[str, int]:
    """The recovery lease's holder (`host:pid:nonce`) and term, once somebody holds it."""

    def held() -> tuple[str, int] | None:
        with session_scope(database_url) as s:
            view = read_lease(s, RECOVERY_LEASE)
        return None if view is None or view.expired else (view.holder, view.term)

    found: tuple[str, int] = wait_for(held, 30, "a recovery leader", 0.1)
    return found


def _process_of(lab: Lab, holder: str) -> Proc:
    pid = int(holder.split(":")[1])
    procs = [*lab.stack.workers, *([lab.stack.beat] if lab.stack.beat else [])]
    return next(p for p in procs if p.pid == pid)


def unpublished_job(database_url: str, duration_s: float) -> str:
    """A queued job committed by an API that died before publishing it: no message."""
    with session_scope(database_url) as s:
        return create_job(
            s,
            tenant_id=DEFAULT_TENANT,
            kind=JobKind.NOOP,
            spec={"duration_s": duration_s},
            priority=0,
            max_attempts=3,
            metadata={},
        ).id


def kill_recovery_leader(lab: Lab, duration_s: float = 6.0) -> Outcome:
    """kill -9 the recovery leader, the beat and the worker running a job, at once; then
    a job is committed with no message. The surviving workers elect a leader, which puts
    the lost worker's job back in the queue and publishes the unpublished one: both run."""
    lab.fleet(3)
    if lab.stack.beat is None or not lab.stack.beat.alive():
        lab.stack.start_beat()
    running = lab.noop(duration_s)
    lab.wait(running["id"], ("running",), 60)
    runner = lab.owner(running["id"])
    holder, term = recovery_leader(lab.database_url)
    leader = _process_of(lab, holder)
    victims = {p.pid: p for p in (leader, runner, lab.stack.beat) if p is not None}
    killed = now()
    for proc in victims.values():
        proc.kill9()
        if proc in lab.stack.workers:
            lab.deaths[proc.identity] = killed
    lab.stack.workers = [p for p in lab.stack.workers if p.pid not in victims]
    lab.stack.beat = None
    unpublished = unpublished_job(lab.database_url, 0.5)
    jobs = [running["id"], unpublished]
    done = lab.settle(jobs, 120)
    new_holder, new_term = recovery_leader(lab.database_url)
    found = lab.audit(jobs)
    claims: list[datetime | None] = [claimed_at(lab.database_url, j, killed) for j in jobs]
    recovered = None if None in claims else max(c for c in claims if c is not None)
    return Outcome(
        Figures.of(
            "20. kill -9 the recovery leader, the beat and a busy worker",
            found,
            seconds(killed, recovered),
            note=ended(found),
        ),
        found,
        {
            "done": done,
            "jobs": jobs,
            "old_leader": (holder, term, leader.name),
            "new_leader": (new_holder, new_term),
            "killed": sorted(victims),
            "survivors": [p.pid for p in lab.stack.workers if p.alive()],
        },
    )
