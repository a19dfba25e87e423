"""Fault scenarios on test hosts (tests/support/netns.py): the control host runs PostgreSQL,
Redis, the API, beat and an S3 server (moto), the worker hosts run one worker each with a
data dir of its own, and checkpoints pass between hosts through the S3 store only. Cutting a
host's link cuts it off from all of them at once, as a pulled cable would.

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
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select

from core.storage import ArtifactStore
from db.models import Checkpoint, Job
from db.session import session_scope
from tests.conftest import TINY_MODEL
from tests.faults.scenarios import FAULT_SETTINGS, Outcome, finetune_spec, now, seconds
from tests.support.datasets import write_text_jsonl
from tests.support.faults import Figures, audit, claimed_at
from tests.support.harness import TERMINAL, wait_for
from tests.support.hosts_stack import HostsStack, hosts_stack
from tests.support.netns import Host, Hosts, hosts
from tests.support.s3 import S3Store, moto_s3_store
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
    late_events = [
        e
        for e in ran_on[taken:]
        if victim in {(e["data"] or {}).get("worker"), (e["data"] or {}).get("by")}
    ]
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
