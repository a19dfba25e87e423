"""Fault scenarios on test hosts (tests/support/netns.py): the control host runs PostgreSQL,
Redis, the API, beat and an S3 server (moto), the worker hosts run one worker each with a
data dir of its own, and checkpoints pass between hosts through the S3 store only. Cutting a
host's link cuts it off from all of them at once, as a pulled cable would.

Rows 27 (Redis unreachable from every worker host) and 28 (the recovery leader's host cut
off) are below row 26's.

Row 26 of the fault table: a worker host cut off mid fine-tune. The host cannot write
anything while it is cut off, so the database alone cannot tell when it stopped: its
own evidence is read from its disk (the step marker the runner rewrites after every
training step, tests/support/faults.BOOKKEEPING) and its worker's log, with the database's
events on the same clock (every namespace shares this machine's).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select

from core.storage import ArtifactStore
from db.leader import LeaseView, read_lease
from db.models import Checkpoint, Job
from db.session import session_scope
from tests.conftest import TINY_MODEL
from tests.faults.leader_scenarios import unpublished_job
from tests.faults.scenarios import FAULT_SETTINGS, Outcome, ended, finetune_spec, now, seconds
from tests.support.datasets import write_text_jsonl
from tests.support.faults import Figures, audit, claimed_at
from tests.support.harness import TERMINAL, wait_for
from tests.support.hosts_stack import HostsStack, hosts_stack
from tests.support.netns import Host, Hosts, hosts
from tests.support.s3 import S3Store, moto_s3_store
from workers.leader import MIN_TICK_S, RECOVERY_LEASE
from workers.leases import lease_key, lease_value

logger = logging.getLogger(__name__)

# The fault stack's leases and periods; a cut-off worker's database connections count as
# lost after 3 s (tests/e2e/test_hosts.py), and the server ends a session the cut left inside
# a transaction after 3 s rather than the default 30 s: until then it keeps the row locks it
# took (a lease renewal cut between its UPDATE and its COMMIT holds the job's row).
HOST_FAULT_SETTINGS = {
    **FAULT_SETTINGS,
    "database_connect_timeout_s": "3",
    "database_idle_in_transaction_s": "3",
}
STEP_MARKER = "last_step"  # workers/training/layout.STEP_MARKER, read from the host's disk
WATCHDOG_LINE = "neither lease renewed"  # workers/heartbeat.Heartbeat.check's stop
REFUSED_LINE = (
    "attempt 1 lost the job"  # workers/lifecycle: a fenced write of a stale attempt refused
)


@dataclass
class HostsLab:
    """Two worker hosts, a stack over them and the S3 store they share."""

    hosts: Hosts
    stack: HostsStack
    store: S3Store
    workdir: Path

    @property
    def database_url(self) -> str:
        return self.stack.database_url

    def data_dir(self, host: Host) -> Path:
        """The worker's data dir on `host` (hosts_stack's MODELYARD_DATA_DIR)."""
        return host.data_dir / "data"

    def linked(self) -> None:
        """Every worker host on the network and running one live worker."""
        for host in self.hosts.workers:
            self.hosts.restore(host)
            if self.stack.worker_of(host) is None:
                self.stack.start_worker_on(host)

    def submit(self, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        with self.stack.client() as c:
            resp = c.post("/v1/jobs", json={"kind": kind, "spec": spec})
        assert resp.status_code == 202, resp.text
        job: dict[str, Any] = resp.json()
        return job

    def text_dataset(self, rows: int = 200) -> str:
        path = write_text_jsonl(self.workdir / f"text-{rows}.jsonl", rows=rows)
        with self.stack.client() as c, path.open("rb") as fh:
            resp = c.post("/v1/datasets", files={"file": (path.name, fh)})
        assert resp.status_code == 201, resp.text
        dataset_id: str = resp.json()["id"]
        return dataset_id

    def claims(self, job_id: str) -> list[str]:
        return audit(self.database_url, [job_id]).claims(job_id)

    def store_snapshot(self, into: Path) -> Path:
        """The store's files copied under `into` with their S3 LastModified as mtime, so that
        tests/support/faults.audit reads them as it reads a file:// store (LastModified has
        whole seconds: a file changed less than a second after the final commit reads as
        before it)."""
        fs = self.store.filesystem()
        base = self.store.url.removeprefix("s3://").rstrip("/")
        for key, info in fs.find(base, detail=True).items():
            local = into / key.removeprefix(base + "/")
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(local))
            changed = info["LastModified"].timestamp()
            os.utime(local, (changed, changed))
        return into


@contextmanager
def hosts_lab(workdir: Path, tiny_model_dir: Path) -> Iterator[HostsLab]:
    """Two worker hosts and a control host (with the S3 server on its address), the fault
    settings, and the tiny model in the store (no host has it on disk)."""
    with ExitStack() as stack_of:
        made = stack_of.enter_context(hosts(2, workdir / "hosts"))
        control = made.control
        store = stack_of.enter_context(moto_s3_store(host=control.address, netns=control.netns))
        operator = workdir / "operator"
        model = operator / "models" / TINY_MODEL
        shutil.copytree(tiny_model_dir, model)
        ArtifactStore(operator, store.url, store.options).publish(model)
        stack = stack_of.enter_context(
            hosts_stack(
                made,
                workdir / "logs",
                storage_url=store.url,
                storage_options=json.dumps(store.options),
                **HOST_FAULT_SETTINGS,
            )
        )
        yield HostsLab(made, stack, store, workdir)


def _log_time(line: str) -> datetime | None:
    """The time of a worker log line (core/logs.py's text format, local time)."""
    try:
        stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return stamp.astimezone(UTC)


def _first_logged(log: Path, text: str, job_id: str) -> datetime | None:
    for line in log.read_text(errors="replace").splitlines():
        if text in line and job_id in line:
            return _log_time(line)
    return None


def _checkpoints(database_url: str, job_id: str) -> list[tuple[int, str]]:
    with session_scope(database_url, readonly=True) as s:
        rows = s.execute(
            select(Checkpoint.step, Checkpoint.path)
            .where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.step)
        ).all()
    return [(int(step), str(path)) for step, path in rows]


def _lease_end(
    database_url: str, broker_url: str, job_id: str, victim: str, timeout: float
) -> datetime | None:
    """When the cut-off attempt's hold on the job ends: the later of its database lease and
    its broker lease (the reconciler takes a job only once both ran out), read until the
    job leaves that attempt. After the cut its holder renews neither, so the last values
    read are their ends."""
    attempt = 1
    broker = redis.Redis.from_url(broker_url)
    end: datetime | None = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with session_scope(database_url, readonly=True) as s:
                row = s.execute(
                    select(Job.status, Job.attempts, Job.lease_expires_at).where(Job.id == job_id)
                ).one()
            if row.status != "running" or row.attempts != attempt:
                return end
            ends = [row.lease_expires_at]
            held, left_ms = broker.get(lease_key(job_id)), broker.pttl(lease_key(job_id))
            if held == lease_value(victim, attempt).encode() and left_ms > 0:
                ends.append(now() + timedelta(milliseconds=left_ms))
            end = max(e for e in ends if e is not None)
            time.sleep(0.05)
    finally:
        broker.close()
    return end


def _of_attempt(checkpoints: list[tuple[int, str]], attempt: int) -> list[int]:
    return [step for step, path in checkpoints if f"/attempts/{attempt}/" in f"/{path}"]


# 26 -----------------------------------------------------------------------------------------
def _late_effect(event: dict[str, Any], worker: str) -> bool:
    """An event by `worker` after another attempt took its job. Its own best-effort note
    that it stopped on a lost lease (workers/lifecycle.py `_note`) is not one: it changes
    nothing, and lands whenever the link is back before that write gives up."""
    data = event["data"] or {}
    if worker not in {data.get("worker"), data.get("by")}:
        return False
    return data.get("reason") != "lease_lost"


def cut_off_mid_finetune(lab: HostsLab, steps: int = 80, every: int = 40) -> Outcome:
    """Cut the link of the worker host running a fine-tune as soon as its first checkpoint
    is recorded (in the store and the database); the other host resumes the job from that
    checkpoint once the lease is gone. Then the link comes back and the other host's worker
    stops: the cut-off host takes the next job.

    The steps are slow enough (batches of 64) that the cut-off host cannot reach its next
    checkpoint before it stops: a checkpoint write stuck on the cut network would hold its
    training still and hide whether it stopped in time. Concurrent executions are the
    audit's, plus one where the cut-off host's last training step (its step marker)
    ended after the other host's claim; stale writes are the audit's over the winner's data
    dir and the store, plus the job's events after that claim naming the cut-off worker."""
    lab.linked()
    stack = lab.stack
    dataset = lab.text_dataset()
    job = lab.submit("finetune", finetune_spec(dataset, steps, every, batch_size=64))
    job_id = job["id"]
    stack.wait_status(job_id, ("running",), 60)
    (victim,) = wait_for(lambda: lab.claims(job_id), 30, "the first claim", 0.1)
    victim_host = stack.host_named(victim)
    survivor_host = next(h for h in lab.hosts.workers if h is not victim_host)
    victim_proc = stack.worker_of(victim_host)
    assert victim_proc is not None
    wait_for(lambda: _checkpoints(lab.database_url, job_id), 180, "first checkpoint", 0.05)
    cut_at = now()
    lab.hosts.cut(victim_host)
    try:
        lease_end = _lease_end(
            lab.database_url, stack.env["MODELYARD_BROKER_URL"], job_id, victim, 60
        )
        done = stack.wait_status(job_id, TERMINAL, 180)
        settled_events = stack.events(job_id)
    finally:
        lab.hosts.restore(victim_host)
    before_cut = _of_attempt(_checkpoints(lab.database_url, job_id), 1)

    # back on the network, the survivor's worker stopped: the victim takes the next job
    survivor_proc = stack.worker_of(survivor_host)
    if survivor_proc is not None:
        survivor_proc.stop()
        stack.workers.remove(survivor_proc)
    later = lab.submit("noop", {"duration_s": 0.2})
    later_done = stack.wait_status(later["id"], TERMINAL, 120)

    # the victim's own evidence: its last training step and its stop, from its disk and log
    (marker,) = lab.data_dir(victim_host).rglob(f"jobs/{job_id}/attempts/1/{STEP_MARKER}")
    last_step = int(marker.read_text())
    last_step_at = datetime.fromtimestamp(marker.stat().st_mtime, UTC)
    log = victim_proc.log
    stop_asked_at = _first_logged(log, WATCHDOG_LINE, job_id)
    found = audit(
        lab.database_url,
        [job_id, later["id"]],
        data_dir=lab.data_dir(survivor_host),
        store_dir=lab.store_snapshot(lab.workdir / f"store-{job_id}"),
    )
    attempts = found.attempts[job_id]
    taken_at = attempts[1].start if len(attempts) > 1 else None
    ran_on = stack.events(job_id)
    taken = max(i for i, e in enumerate(ran_on) if e["message"].startswith("claimed by"))
    late_events = [e for e in ran_on[taken:] if _late_effect(e, victim)]
    overlapped = taken_at is not None and last_step_at >= taken_at
    result = done.get("result") or {}
    resumed_from = result.get("resumed_from_step")
    redone = None if resumed_from is None else last_step - int(resumed_from)
    figures = Figures.of(
        "26. worker host cut off mid fine-tune (network namespace link down), link back later",
        found,
        seconds(cut_at, claimed_at(lab.database_url, job_id, cut_at)),
        note=f"succeeded {sum(s == 'succeeded' for s in found.statuses.values())}",
    )
    figures = replace(
        figures,
        concurrent=figures.concurrent + int(overlapped),
        stale_writes=figures.stale_writes + len(late_events),
        steps_redone=max(x for x in (redone, figures.steps_redone, 0) if x is not None),
    )
    logger.info(
        "cut off at %s; victim's last step %d at %s, stop asked at %s, lease ended at %s; "
        "taken over at %s",
        cut_at,
        last_step,
        last_step_at,
        stop_asked_at,
        lease_end,
        taken_at,
    )
    return Outcome(
        figures,
        found,
        {
            "job": done,
            "later": later_done,
            "victim": victim,
            "victim_host": victim_host.name,
            "survivor_host": survivor_host.name,
            "claim_hosts": [stack.host_named(w).name for w in found.claims(job_id)],
            "later_hosts": [stack.host_named(w).name for w in found.claims(later["id"])],
            "checkpoints_of_attempt_1": before_cut,
            "cut_at": cut_at,
            "last_step": last_step,
            "last_step_at": last_step_at,
            "stop_asked_at": stop_asked_at,
            "lease_end": lease_end,
            "taken_at": taken_at,
            "late_events": late_events,
            "events_unchanged": stack.events(job_id) == settled_events,
            "refused_logged": REFUSED_LINE in log.read_text(errors="replace"),
        },
    )


# 27 -----------------------------------------------------------------------------------------
def redis_cut_from_workers(lab: HostsLab, outage_s: float = 30.0, after_s: float = 8.0) -> Outcome:
    """Redis on the control host unreachable from every worker host for `outage_s`
    (iptables DROP on its port for the worker hosts' addresses; the API and beat on the
    control host keep it) while a job runs, and three jobs are submitted meanwhile.

    The running job's worker renews its database lease all along (the database is not cut)
    though it cannot renew its broker lease, so nothing takes the job from it: it succeeds
    in its first attempt. The jobs submitted meanwhile are published by the API and wait in
    Redis; once the workers reach it again each runs once. Time to recover is from Redis
    reachable again to the last of those claimed. The running job goes on for `after_s`
    past the outage, so those jobs are the other (idle) host's to run: they show how soon
    its worker consumes again."""
    lab.linked()
    stack = lab.stack
    running = lab.submit("noop", {"duration_s": outage_s + after_s})["id"]
    stack.wait_status(running, ("running",), 60)
    (busy,) = wait_for(partial(lab.claims, running), 30, "the claim", 0.1)
    samples: list[tuple[datetime, str, int, datetime | None]] = []
    with stack.redis_blocked():
        cut_at = now()
        queued = [lab.submit("noop", {"duration_s": 0.2})["id"] for _ in range(3)]
        while (now() - cut_at).total_seconds() < outage_s:
            with session_scope(lab.database_url, readonly=True) as s:
                row = s.execute(
                    select(Job.status, Job.attempts, Job.lease_expires_at).where(Job.id == running)
                ).one()
            samples.append((now(), str(row.status), int(row.attempts), row.lease_expires_at))
            time.sleep(0.5)
    back_at = now()
    jobs = [running, *queued]
    done = {job_id: stack.wait_status(job_id, TERMINAL, 120) for job_id in jobs}
    claims = [claimed_at(lab.database_url, job_id, back_at) for job_id in queued]
    recovered = None if None in claims else max(c for c in claims if c is not None)
    found = audit(lab.database_url, jobs)
    return Outcome(
        Figures.of(
            f"27. Redis on the control host unreachable from every worker host {outage_s:g}s "
            "(iptables DROP) with a job running",
            found,
            seconds(back_at, recovered),
            note=ended(found),
        ),
        found,
        {
            "running": running,
            "queued": queued,
            "done": done,
            "cut_at": cut_at,
            "back_at": back_at,
            "samples": samples,
            "claims": {job_id: found.claims(job_id) for job_id in jobs},
            "busy_host": stack.host_named(busy).name,
            "claim_hosts": {
                job_id: [stack.host_named(w).name for w in found.claims(job_id)] for job_id in jobs
            },
            "finished_at": datetime.fromisoformat(done[running]["finished_at"]),
            "recovered_at": recovered,
        },
    )


# 28 -----------------------------------------------------------------------------------------
def _lease(database_url: str) -> LeaseView | None:
    with session_scope(database_url, readonly=True) as s:
        return read_lease(s, RECOVERY_LEASE)


def _pid(holder: str) -> int:
    """The process id in a lease holder's name (workers.leader.holder_name: host:pid:nonce)."""
    return int(holder.split(":")[1])


def _logged_after(log: Path, text: str, after: datetime) -> list[str]:
    """The lines of `log` containing `text` logged at or after `after`."""
    return [
        line
        for line in log.read_text(errors="replace").splitlines()
        if text in line and (stamp := _log_time(line)) is not None and stamp >= after
    ]


def cut_off_recovery_leader(lab: HostsLab, duration_s: float = 4.0) -> Outcome:
    """Cut off the worker host whose worker holds the recovery lease, while it runs a job.

    The beat on the control host is stopped first (it gives the lease up), so one of the two
    workers leads; then a noop job runs on the leader's host (and one on the other host when
    the first landed there), the leader's host is cut off
    and a job is committed with no message (an API that died before publishing). Only a
    leader repairs either: the other host's worker must take the lease (within the lease,
    half a reconcile period, and one election tick of the old holder's last renewal:
    workers/leader.py), put the cut-off host's job back in the queue once its leases ran
    out, and publish the unpublished job. The link comes back once both have succeeded:
    the cut-off worker must not act on the lease it held (the lease row keeps its new holder
    and term; its log shows no reconcile pass and no lease held after the cut). Time to
    recover is from the cut to the last of the two jobs claimed again."""
    lab.linked()
    stack = lab.stack
    if stack.beat is not None:
        stack.beat.stop()  # gives the lease up on its way out
        stack.beat = None
    try:
        return _cut_off_leader(lab, duration_s)
    finally:
        stack.start_beat()


def _cut_off_leader(lab: HostsLab, duration_s: float) -> Outcome:
    stack, database_url = lab.stack, lab.database_url

    def a_worker_leads() -> tuple[str, int] | None:
        view = _lease(database_url)
        if view is None or view.expired or _pid(view.holder) not in stack.host_of:
            return None
        return view.holder, view.term

    # the beat gave the lease up (or it ran out): one of the workers takes it
    holder, term = wait_for(a_worker_leads, 30, "a worker holding the recovery lease", 0.1)
    leader_host = stack.host_of[_pid(holder)]
    other_host = next(h for h in lab.hosts.workers if h is not leader_host)
    leader_proc, other_proc = stack.worker_of(leader_host), stack.worker_of(other_host)
    assert leader_proc is not None and other_proc is not None
    # a job on the leader's host: the first job, or else the second (a worker runs one at
    # a time, so with the other host busy the second goes to the leader's)
    jobs: list[str] = []
    ran_on: dict[str, str] = {}  # host name -> job
    while leader_host.name not in ran_on and len(jobs) < 2:
        job_id = lab.submit("noop", {"duration_s": duration_s})["id"]
        jobs.append(job_id)
        stack.wait_status(job_id, ("running",), 60)
        (worker,) = wait_for(partial(lab.claims, job_id), 30, "a claim", 0.1)
        ran_on[stack.host_named(worker).name] = job_id
    if leader_host.name not in ran_on:
        raise AssertionError(f"no job ran on the leader's host {leader_host.name}: {ran_on}")
    leader_job, other_job = ran_on[leader_host.name], ran_on.get(other_host.name)

    before = _lease(database_url)
    assert before is not None and before.holder == holder, (before, holder)
    cut_at = now()
    lab.hosts.cut(leader_host)
    try:
        unpublished = unpublished_job(database_url, 0.5)
        # the old holder's last renewal, then its successor (polled from the runner)
        old_end = before.expires_at
        deadline = time.monotonic() + 30
        while True:
            view = _lease(database_url)
            if view is not None and view.holder != holder:
                new_holder, new_term = view.holder, view.term
                break
            if view is not None:
                old_end = view.expires_at
            if time.monotonic() > deadline:
                raise AssertionError(f"nobody took the recovery lease from {holder}: {view}")
            time.sleep(0.05)
        seen_at = now()
        done = {job_id: stack.wait_status(job_id, TERMINAL, 120) for job_id in [*jobs, unpublished]}
    finally:
        restored_at = now()
        lab.hosts.restore(leader_host)
    # back on the network: the lease stays with its new holder for several of the old
    # holder's election ticks and well past the lease it held
    ttl = float(stack.env["MODELYARD_RECONCILE_PERIOD_S"]) / 2
    tick = max(MIN_TICK_S, ttl / 3)
    after_restore: list[tuple[str, int] | None] = []
    watch_until = time.monotonic() + max(2.0, ttl + 5 * tick)
    while time.monotonic() < watch_until:
        view = _lease(database_url)
        after_restore.append(None if view is None else (view.holder, view.term))
        time.sleep(0.05)
    # the leader's own account (one clock: every namespace shares this machine's)
    took = _logged_after(other_proc.log, f"holding the recovery lease (term {new_term})", cut_at)
    taken_at = _log_time(took[0]) if took else None
    ids = [*jobs, unpublished]
    found = audit(database_url, ids)
    claims_after_cut = [claimed_at(database_url, j, cut_at) for j in (leader_job, unpublished)]
    recovered_at = (
        None if None in claims_after_cut else max(c for c in claims_after_cut if c is not None)
    )
    events = stack.events(leader_job)
    claimed = max(i for i, e in enumerate(events) if e["message"].startswith("claimed by"))
    old_worker = found.claims(leader_job)[0]
    late_events = [e for e in events[claimed:] if _late_effect(e, old_worker)]
    old_log = leader_proc.log
    stale_passes = _logged_after(old_log, "reconciled:", cut_at)
    stale_holds = _logged_after(old_log, "holding the recovery lease", cut_at)
    moved_s = seconds(cut_at, taken_at)
    figures = Figures.of(
        "28. worker host holding the recovery lease cut off (beat stopped) with its job "
        "running and a job never published",
        found,
        seconds(cut_at, recovered_at),
        note=f"{ended(found)}; lease taken {moved_s}s after the cut",
    )
    figures = replace(figures, stale_writes=figures.stale_writes + len(late_events))
    logger.info(
        "leader %s cut off at %s (its lease ended %s); %s took the lease (term %d) at %s",
        holder,
        cut_at,
        old_end,
        new_holder,
        new_term,
        taken_at,
    )
    return Outcome(
        figures,
        found,
        {
            "old": (holder, term),
            "new": (new_holder, new_term),
            "leader_host": leader_host.name,
            "other_host": other_host.name,
            "new_leader_host": stack.host_of[_pid(new_holder)].name
            if _pid(new_holder) in stack.host_of
            else new_holder,
            "leader_job": leader_job,
            "other_job": other_job,
            "unpublished": unpublished,
            "done": done,
            "claim_hosts": {
                job_id: [stack.host_named(w).name for w in found.claims(job_id)] for job_id in ids
            },
            "cut_at": cut_at,
            "old_lease_end": old_end,
            "seen_at": seen_at,
            "taken_at": taken_at,
            "ttl_s": ttl,
            "tick_s": tick,
            "restored_at": restored_at,
            "after_restore": after_restore,
            "late_events": late_events,
            "stale_passes": stale_passes,
            "stale_holds": stale_holds,
            "lost_logged": bool(_logged_after(old_log, "lost the recovery lease", cut_at)),
            "republished": any(
                e["message"].startswith("message lost by the broker")
                for e in stack.events(unpublished)
            ),
        },
    )
