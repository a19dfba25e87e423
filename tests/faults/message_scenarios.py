"""Fault scenarios of issue 16 (fault 3): a job queued in the database whose message is not
where a worker would take it. The reconciler reads the broker itself (no marker of its own
that could outlive the message) and republishes; each job must succeed.

- a crash between the commit of a job and its publish (the row is inserted as the API
  inserts it, and nothing is published);
- a consumer killed between receiving a message and claiming its job (the message waits in
  kombu's `unacked`, which Redis would deliver again only after the visibility timeout);
- Redis with `appendonly yes`, `appendfsync everysec` killed with -9 right after a publish,
  its append-only file cut before the push (what an fsync a second late loses), restarted.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from core.dispatch import JobPublisher
from core.enums import JobKind
from tests.faults.scenarios import Lab, Outcome, ended, now, seconds
from tests.support.faults import Figures, claimed_at, event_time
from tests.support.harness import TERMINAL, wait_for
from tests.support.jobs import insert_job

TORN_BYTES = 7  # a command cut part way: Redis loads the file up to the last whole command


def _presence(lab: Lab, job_ids: list[str]) -> dict[str, str]:
    publisher = JobPublisher(lab.settings())
    try:
        found = publisher.messages()
    finally:
        publisher.close()
    return {job_id: found.presence(job_id).value for job_id in job_ids}


def _outcome(
    lab: Lab, name: str, job_ids: list[str], start: datetime, **details: object
) -> Outcome:
    """Wait (generously) for the jobs to end and audit them."""
    done = {job_id: lab.wait(job_id, TERMINAL, 120) for job_id in job_ids}
    found = lab.audit(job_ids)
    claims = [claimed_at(lab.database_url, job_id, start) for job_id in job_ids]
    last = max((c for c in claims if c is not None), default=None)
    republished = {
        job_id: event_time(lab.database_url, job_id, "republished", start) is not None
        for job_id in job_ids
    }
    return Outcome(
        Figures.of(name, found, seconds(start, last), note=ended(found)),
        found,
        {"done": done, "republished": republished, **details},
    )


def crash_between_commit_and_publish(lab: Lab, jobs: int = 3) -> Outcome:
    """Queued rows committed and never published, as when the API dies between the two."""
    lab.fleet(2)
    start = now()
    ids = [insert_job(lab.database_url, kind=JobKind.NOOP) for _ in range(jobs)]
    before = _presence(lab, ids)
    name = f"3a. crash between commit and publish, {jobs} jobs"
    return _outcome(lab, name, ids, start, before=before)


def consumer_killed_before_claim(lab: Lab) -> Outcome:
    """The only consuming worker kills itself (SIGKILL) when the message arrives, after kombu
    took it into `unacked` and before the claim; then plain workers start."""
    lab.fleet(0)
    victim = lab.special_worker(test_die_before_claim="1")
    start = now()
    job = lab.noop(0.1)
    wait_for(lambda: not victim.alive(), 60, "the receiving worker to die", 0.05)
    lab.deaths[victim.identity] = now()
    lab.stack.workers.remove(victim)
    victim.stop()
    waiting = _presence(lab, [job["id"]])
    lab.fleet(2)
    return _outcome(
        lab,
        "3b. consumer killed between receive and claim",
        [job["id"]],
        start,
        before=waiting,
        victim=victim.identity,
    )


def _aof(lab: Lab) -> Path | None:
    """The incremental append-only file Redis writes to now."""
    found = sorted((lab.broker.workdir / "appendonlydir").glob("*.incr.aof"))
    return found[-1] if found else None


def _aof_size(lab: Lab) -> int | None:
    aof = _aof(lab)
    return aof.stat().st_size if aof is not None and aof.stat().st_size else None


def aof_everysec_loses_the_push(lab: Lab, jobs: int = 3) -> Outcome:
    """No worker consumes; Redis runs with AOF `everysec`; jobs are submitted through the API
    (committed, then published); Redis is killed with -9 and its AOF cut back to before the
    pushes, with a torn command at the end; it restarts from that file, then workers start."""
    lab.fleet(0)
    lab.broker.shutdown(keep_data=False)
    lab.broker.start(aof=True)
    try:
        wait_for(lambda: _aof(lab), 10, "the append-only file")
        with lab.broker.client() as client:
            client.set("modelyard:test:aof", "before")  # something the restart must keep
        size: int = wait_for(lambda: _aof_size(lab), 10, "the first AOF write")
        start = now()
        ids = [lab.noop(0.1)["id"] for _ in range(jobs)]
        published = _presence(lab, ids)
        lab.broker.kill9()
        aof = _aof(lab)
        assert aof is not None
        with aof.open("r+b") as fh:
            fh.truncate(min(aof.stat().st_size, size + TORN_BYTES))
        lab.broker.start(aof=True)
        with lab.broker.client() as client:
            kept = client.get("modelyard:test:aof")
        after_restart = _presence(lab, ids)
        lab.fleet(2)
        return _outcome(
            lab,
            f"3c. Redis AOF everysec killed after a publish, {jobs} jobs",
            ids,
            start,
            published=published,
            after_restart=after_restart,
            kept=kept,
        )
    finally:
        lab.broker.shutdown(keep_data=True)
        lab.broker.start()  # the lab's usual server, from the snapshot just saved
