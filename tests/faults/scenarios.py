"""The fault scenarios of issue 5, each a function that injects one fault into a real stack
(API, beat and worker processes, a private Redis and a private PostgreSQL) and returns what
happened: the table's figures and what the tests assert on.

tests/faults/test_*.py run them at test size; bench/faults.py runs them (with the issue's
outage lengths) and prints the table. Scenario 1 (kill -9 of a worker mid fine-tune) is
`kill_worker_mid_finetune`, run by tests/e2e/test_finetune.py on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from core.dispatch import JobPublisher, make_celery
from core.settings import Settings
from tests.conftest import TINY_MODEL
from tests.support.datasets import write_text_jsonl
from tests.support.faults import (
    Audit,
    Figures,
    audit,
    claimed_at,
    event_time,
    kill9,
    limit_file_size,
    limit_memory,
    pool_child,
)
from tests.support.harness import TERMINAL, Proc, Stack, wait_for
from tests.support.services import PostgresCluster, RedisServer
from workers.reconciler import reconcile

logger = logging.getLogger(__name__)

INJECT_DIR = Path(__file__).parent / "inject"
POISON_DURATION_S = 0.0666  # a no-op job of exactly this length kills its worker
# a no-op job of exactly this length fails with a transient error as soon as it is cancelled
TRANSIENT_ON_CANCEL_DURATION_S = 30.0777
# a no-op job of exactly this length sleeps that long without looking at its stop flag
IGNORE_STOP_DURATION_S = 15.0888
# recording the outputs of a generation job whose prompt holds this text fails (DataError)
DB_ERROR_MARKER = "record-this-and-the-database-refuses"
# the finishing COMMIT of a fine-tune with this suffix lands, then raises (connection lost)
COMMIT_DROP_SUFFIX = "commit-then-drop"
# The stack's settings for fault runs: short leases and periods so recovery takes seconds.
FAULT_SETTINGS = {
    "lease_ttl_s": "3",
    "heartbeat_interval_s": "0.5",
    "reconcile_period_s": "1",
    "republish_grace_s": "1",
    "retry_backoff_s": "0.5",
    "worker_stall_s": "3",
    "job_time_limit_s": "600",
    "broker_visibility_timeout_s": "3600",
    "db_retry_s": "120",
    "stop_grace_s": "3",
}


def fault_env() -> dict[str, str]:
    """Environment for every process of a fault stack (the poison hook is loaded by all)."""
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": f"{INJECT_DIR}{os.pathsep}{path}" if path else str(INJECT_DIR),
        "MODELYARD_TEST_POISON_DURATION_S": str(POISON_DURATION_S),
        "MODELYARD_TEST_TRANSIENT_ON_CANCEL_DURATION_S": str(TRANSIENT_ON_CANCEL_DURATION_S),
        "MODELYARD_TEST_IGNORE_STOP_DURATION_S": str(IGNORE_STOP_DURATION_S),
        "MODELYARD_TEST_DB_ERROR_MARKER": DB_ERROR_MARKER,
        "MODELYARD_TEST_COMMIT_DROP_SUFFIX": COMMIT_DROP_SUFFIX,
    }


@dataclass
class Outcome:
    figures: Figures
    audit: Audit
    details: dict[str, Any] = field(default_factory=dict)


def ended(found: Audit) -> str:
    """The jobs' final statuses counted, for the table's note: "succeeded 2, failed 1"."""
    counts: dict[str, int] = {}
    for status in found.statuses.values():
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))


def seconds(start: datetime, end: datetime | None) -> float | None:
    return None if end is None else round((end - start).total_seconds(), 2)


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Lab:
    """A fault stack and what the scenarios need around it."""

    stack: Stack
    broker: RedisServer
    database_url: str
    workdir: Path
    pg: PostgresCluster | None = None
    store_dir: Path | None = None  # the root of the stack's file:// artifact store
    deaths: dict[str, datetime] = field(default_factory=dict)
    _plain: set[int] = field(default_factory=set)

    # -- workers ------------------------------------------------------------------------------
    def fleet(self, n: int = 2) -> list[Proc]:
        """Exactly `n` live workers with the stack's own settings, idle or not."""
        for proc in list(self.stack.workers):
            if not proc.alive():
                self.note_death(proc)
                self.stack.workers.remove(proc)
            elif proc.pid not in self._plain:
                proc.stop()
                self.stack.workers.remove(proc)
        while len(self.stack.workers) > n:
            self.stack.workers.pop(0).stop()
        while len(self.stack.workers) < n:
            self._plain.add(self.stack.start_worker().pid)
        return list(self.stack.workers)

    def stop_recovery(self) -> None:
        """No process runs for the recovery lease: the beat and every worker stopped (the
        next fleet() starts plain workers, start_beat() the beat again)."""
        if self.stack.beat is not None:
            self.stack.beat.stop()
            self.stack.beat = None
        self.fleet(0)

    def special_worker(self, pool: str | None = None, **settings: str) -> Proc:
        """A worker with its own settings; the next fleet() stops it."""
        env = {f"MODELYARD_{k.upper()}": v for k, v in settings.items()}
        return self.stack.start_worker(pool=pool, env=env)

    def note_death(self, proc: Proc) -> None:
        self.deaths.setdefault(proc.identity, proc.killed_at or now())
        proc.stop()  # reaps it and closes its log

    def restart_dead_workers(self) -> int:
        """The supervisor's job: a worker that died is noted and replaced."""
        restarted = 0
        for proc in list(self.stack.workers):
            if not proc.alive():
                self.note_death(proc)
                self.stack.workers.remove(proc)
                self._plain.add(self.stack.start_worker().pid)
                restarted += 1
        return restarted

    def all_deaths(self) -> dict[str, datetime]:
        found = dict(self.deaths)
        for proc in self.stack.workers:
            if proc.killed_at is not None:
                found[proc.identity] = proc.killed_at
        return found

    # -- HTTP -----------------------------------------------------------------------------
    def submit(self, kind: str, spec: dict[str, Any], **body: Any) -> dict[str, Any]:
        with self.stack.client() as c:
            resp = c.post("/v1/jobs", json={"kind": kind, "spec": spec, **body})
        assert resp.status_code == 202, resp.text
        job: dict[str, Any] = resp.json()
        return job

    def noop(self, duration_s: float, **body: Any) -> dict[str, Any]:
        return self.submit("noop", {"duration_s": duration_s}, **body)

    def upload(self, path: Path) -> str:
        with self.stack.client() as c, path.open("rb") as fh:
            resp = c.post("/v1/datasets", files={"file": (path.name, fh)})
        assert resp.status_code == 201, resp.text
        dataset_id: str = resp.json()["id"]
        return dataset_id

    def text_dataset(self, rows: int = 200) -> str:
        return self.upload(write_text_jsonl(self.workdir / f"text-{rows}.jsonl", rows=rows))

    def job(self, job_id: str) -> dict[str, Any]:
        return self.stack.job(job_id)

    def wait(
        self, job_id: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 120
    ) -> dict[str, Any]:
        return self.stack.wait_status(job_id, statuses, timeout)

    def wait_step(self, job_id: str, step: int, timeout: float = 120) -> int:
        def reached() -> int | None:
            detail = self.job(job_id).get("progress_detail") or {}
            value = detail.get("step", 0)
            return int(value) if value >= step else None

        reached_step: int = wait_for(reached, timeout, f"job {job_id} at step {step}", 0.1)
        return reached_step

    def checkpoints(self, job_id: str) -> list[int]:
        with self.stack.client() as c:
            data = c.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        return sorted(int(c["step"]) for c in data)

    def metric_steps(self, job_id: str, name: str = "train_loss") -> list[int]:
        with self.stack.client() as c:
            data = c.get(f"/v1/jobs/{job_id}/metrics", params={"name": name, "limit": 5000}).json()
        return [int(m["step"]) for m in data["data"]]

    def audit(self, job_ids: list[str], **kw: Any) -> Audit:
        return audit(
            self.database_url,
            job_ids,
            deaths=self.all_deaths(),
            data_dir=self.stack.workdir / "data",
            store_dir=self.store_dir,
            **kw,
        )

    def settle(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        """The jobs once all have ended, or as they are after `timeout` (a job stuck for
        ever is audited as stuck rather than ending the scenario with a timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = {job_id: self.job(job_id) for job_id in job_ids}
            if all(j["status"] in TERMINAL for j in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                logger.warning(
                    "jobs not finished after %.0fs: %s",
                    timeout,
                    {i: j["status"] for i, j in jobs.items()},
                )
                return jobs
            time.sleep(0.2)

    def owner(self, job_id: str) -> Proc:
        """The worker process of the job's latest claim."""
        worker = self.audit([job_id]).claims(job_id)[-1]
        return next(p for p in self.stack.workers if p.identity == worker)

    def settings(self) -> Settings:
        return Settings(database_url=self.database_url, broker_url=self.broker.url)

    def check_workers(self) -> tuple[int, str]:
        """`modelyard workers --check` against this stack: (exit code, output)."""
        out = subprocess.run(
            [sys.executable, "-m", "modelyard", "workers", "--check"],
            env=self.stack.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return out.returncode, out.stdout + out.stderr


def finetune_spec(dataset: str, steps: int, every: int, **hp: Any) -> dict[str, Any]:
    """A causal-LM fine-tune of the tiny GPT-2 checkpointing every `every` steps, evaluating
    only at the end."""
    return {
        "base_model": TINY_MODEL,
        "task": "causal_lm",
        "training_dataset": dataset,
        "hyperparameters": {
            "max_steps": steps,
            "batch_size": 4,
            "checkpoint_steps": every,
            "eval_steps": steps,
            "learning_rate": 1e-3,
            **hp,
        },
    }


# 1 ------------------------------------------------------------------------------------------
def kill_worker_mid_finetune(
    stack: Stack, database_url: str, dataset: str, steps: int = 300, every: int = 25
) -> Outcome:
    """kill -9 the worker (main process, solo pool) running a fine-tune half way between
    two checkpoints; a worker resumes the job from its last checkpoint."""
    with stack.client() as c:
        resp = c.post(
            "/v1/jobs", json={"kind": "finetune", "spec": finetune_spec(dataset, steps, every)}
        )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    stack.wait_status(job_id, ("running",), 60)
    claim = next(e for e in stack.events(job_id) if e["message"].startswith("claimed by"))
    victim = next(p for p in stack.workers if p.identity == claim["data"]["worker"])

    def saved() -> bool:
        with stack.client() as c:
            return bool(c.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"])

    wait_for(saved, 180, "first checkpoint", 0.1)
    with stack.client() as c:
        saved_steps = [
            int(x["step"]) for x in c.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        ]

    def half_way() -> bool:
        detail = stack.job(job_id).get("progress_detail") or {}
        return int(detail.get("step", 0)) >= max(saved_steps) + every // 2

    wait_for(half_way, 120, "half way to the next checkpoint", 0.05)
    killed = now()
    victim.kill9()
    stack.workers.remove(victim)
    if not stack.workers:
        stack.start_worker()
    done = stack.wait_status(job_id, TERMINAL, 300)
    found = audit(database_url, [job_id], deaths={victim.identity: killed})
    recover = seconds(killed, claimed_at(database_url, job_id, killed))
    return Outcome(
        Figures.of("1. kill -9 worker mid fine-tune", found, recover),
        found,
        {"job": done, "every": every, "victim": victim.identity, "saved": max(saved_steps)},
    )


# 2 ------------------------------------------------------------------------------------------
def kill_pool_child(lab: Lab, duration_s: float = 4.0) -> Outcome:
    """kill -9 only the pool process of a prefork worker mid job: the worker's main process
    starts a new child and the job runs again once its lease expires."""
    for proc in lab.fleet(0):
        proc.stop()
    worker = lab.special_worker(pool="prefork")
    job = lab.noop(duration_s)
    lab.wait(job["id"], ("running",), 60)
    child = wait_for(lambda: pool_child(worker.pid), 30, "pool child")
    identity = f"{worker.identity.rsplit(':', 1)[0]}:{child}"
    killed = kill9(child)
    lab.deaths[identity] = killed
    done = lab.wait(job["id"], TERMINAL, 90)
    new_child = pool_child(worker.pid)
    found = lab.audit([job["id"]])
    recover = seconds(killed, claimed_at(lab.database_url, job["id"], killed))
    return Outcome(
        Figures.of("2. kill -9 a pool child", found, recover),
        found,
        {
            "job": done,
            "main_alive": worker.alive(),
            "child": child,
            "new_child": new_child,
            "killed_identity": identity,
        },
    )


# 3 ------------------------------------------------------------------------------------------
def visibility_timeout(lab: Lab, duration_s: float = 14.0) -> Outcome:
    """A job that runs longer than the broker's visibility timeout: another worker, started
    with a 2 s visibility timeout, makes Redis deliver the running job's message again. The
    claim finds the job running under a live lease and drops the message. The job lasts
    long enough for that worker to start and redeliver on a loaded machine (CI saw 8 s)."""
    (plain,) = lab.fleet(1)
    started = now()
    job = lab.noop(duration_s)
    lab.wait(job["id"], ("running",), 60)
    short = lab.special_worker(broker_visibility_timeout_s="2", job_time_limit_s="1")

    def dropped() -> bool:
        return bool(lab.audit([job["id"]]).drops[job["id"]])

    wait_for(dropped, duration_s + 30, "the redelivered message dropped", 0.2)
    done = lab.wait(job["id"], TERMINAL, 60)
    found = lab.audit([job["id"]])
    dropped_at = event_time(lab.database_url, job["id"], "delivery dropped", started)
    return Outcome(
        Figures.of("3. job longer than the visibility timeout", found, note="redelivered, dropped"),
        found,
        {
            "job": done,
            "dropped_at": dropped_at,
            "runner": plain.identity,
            "short": short.identity,
        },
    )


def refused_worker_start(stack: Stack) -> subprocess.CompletedProcess[str]:
    """`modelyard worker` with a visibility timeout shorter than the job time limit."""
    env = {
        **stack.env,
        "MODELYARD_BROKER_VISIBILITY_TIMEOUT_S": "30",
        "MODELYARD_JOB_TIME_LIMIT_S": "60",
    }
    return subprocess.run(
        [sys.executable, "-m", "modelyard", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# 4 ------------------------------------------------------------------------------------------
def no_job_behind_busy_worker(lab: Lab, long_s: float = 6.0, short_s: float = 1.0) -> Outcome:
    """Two idle workers, four jobs at once: one long, three short. With prefetch 1 the
    short ones all run on the worker that is free; none waits behind the long one."""
    lab.fleet(2)
    jobs = [lab.noop(long_s), *(lab.noop(short_s) for _ in range(3))]
    done = [lab.wait(j["id"], TERMINAL, 90) for j in jobs]
    found = lab.audit([j["id"] for j in jobs])
    ends = {
        j["id"]: datetime.fromisoformat(d["finished_at"]) for j, d in zip(jobs, done, strict=True)
    }
    starts = {
        j["id"]: datetime.fromisoformat(d["started_at"]) for j, d in zip(jobs, done, strict=True)
    }
    return Outcome(
        Figures.of("4. prefetch: 2 workers, 1 long + 3 short jobs", found),
        found,
        {"jobs": [j["id"] for j in jobs], "starts": starts, "ends": ends, "done": done},
    )


# 5 ------------------------------------------------------------------------------------------
def redis_restart_without_persistence(
    lab: Lab, queued: int = 50, blocker_s: float = 8.0
) -> Outcome:
    """Both workers busy, `queued` jobs waiting; Redis restarts empty (no persistence): every
    message and delivery marker is gone. The reconciler republishes the queued jobs."""
    lab.fleet(2)
    started = now()
    # The blockers must still run when Redis goes: the waiting jobs are sent from 8
    # threads, and the blockers last long enough for that even on a loaded machine.
    blockers = [lab.noop(blocker_s) for _ in range(2)]
    for b in blockers:
        lab.wait(b["id"], ("running",), 60)
    with ThreadPoolExecutor(8) as pool:
        waiting = list(pool.map(lambda _: lab.noop(0.0), range(queued)))
    lost = now()
    lab.broker.shutdown(keep_data=False)
    lab.broker.start()
    back = now()
    ids = [j["id"] for j in [*blockers, *waiting]]
    for job_id in ids:
        lab.wait(job_id, TERMINAL, 120)
    found = lab.audit(ids)
    claims = [claimed_at(lab.database_url, j["id"], back) for j in waiting]
    last = max((c for c in claims if c is not None), default=None)
    republished = sum(
        1 for j in waiting if event_time(lab.database_url, j["id"], "republished", lost) is not None
    )
    firsts = [claimed_at(lab.database_url, j["id"], started) for j in waiting]
    claimed_before = sum(1 for c in firsts if c is not None and c < lost)
    return Outcome(
        Figures.of(
            f"5. Redis restarted without persistence, {queued} queued", found, seconds(back, last)
        ),
        found,
        {
            "republished": republished,
            "claimed_before": claimed_before,
            "waiting": [j["id"] for j in waiting],
        },
    )


# 6 ------------------------------------------------------------------------------------------
def redis_unreachable(lab: Lab, down_s: float = 5.0) -> Outcome:
    """Redis goes away for `down_s` (every connection cut, the port closed) and comes back
    with its data. Jobs accepted meanwhile are published by the reconciler; the workers
    consume again; the readiness check passes."""
    lab.fleet(2)
    before_code, before = lab.check_workers()
    lab.broker.shutdown(keep_data=True)
    cut = now()
    during: list[dict[str, Any]] = []
    while (now() - cut).total_seconds() < down_s:
        if len(during) < 3:
            during.append(lab.noop(0.2))
        time.sleep(0.2)
    lab.broker.start()
    back = now()
    for job in during:
        lab.wait(job["id"], TERMINAL, 120)
    claims = [claimed_at(lab.database_url, j["id"], back) for j in during]
    last = max((c for c in claims if c is not None), default=None)
    after = [lab.noop(0.2) for _ in range(3)]
    for job in after:
        lab.wait(job["id"], TERMINAL, 60)
    time.sleep(1.5)  # a few status reports after the reconnect
    after_code, after_out = lab.check_workers()
    found = lab.audit([j["id"] for j in [*during, *after]])
    return Outcome(
        Figures.of(f"6. Redis unreachable {down_s:g}s", found, seconds(back, last)),
        found,
        {
            "before": (before_code, before),
            "after": (after_code, after_out),
            "during": [j["id"] for j in during],
            "after_jobs": [j["id"] for j in after],
        },
    )


def stalled_workers_detected(lab: Lab, stall_s: float = 3.0) -> dict[str, Any]:
    """Workers alive and idle that no longer consume (their queue consumers cancelled, as
    after Celery #8030): `modelyard workers --check` reports them stalled once a job has
    waited `worker_stall_s`; replaced workers run the job."""
    workers = lab.fleet(2)
    celery = make_celery(lab.settings())
    try:
        for queue in ("generate", "train", "maintenance"):
            celery.control.cancel_consumer(
                queue, destination=[w.hostname for w in workers], reply=True, timeout=5
            )
        job = lab.noop(0.1)
        code, out = wait_for(
            lambda: (lambda r: r if r[0] == 1 else None)(lab.check_workers()),
            stall_s + 30,
            "workers reported stalled",
            0.5,
        )
        waited = lab.job(job["id"])["status"]
    finally:
        celery.close()
    for proc in workers:  # what a liveness probe's restart does
        proc.stop()
        lab.stack.workers.remove(proc)
    lab.fleet(2)
    done = lab.wait(job["id"], TERMINAL, 60)
    ok_code, ok_out = lab.check_workers()
    return {
        "stalled": (code, out),
        "status_while_stalled": waited,
        "job": done,
        "after_restart": (ok_code, ok_out),
        "hostnames": [w.hostname for w in workers],
    }


# 7 ------------------------------------------------------------------------------------------
def postgres_down_during_finetune(lab: Lab, down_s: float = 8.0) -> Outcome:
    """PostgreSQL stops for `down_s` while a fine-tune trains. Training goes on with metrics
    and checkpoint records buffered; the API answers 503; when the database is back the
    buffer is written and the job finishes in its first attempt."""
    assert lab.pg is not None, "this scenario stops the lab's private PostgreSQL"
    lab.fleet(1)
    dataset = lab.text_dataset()
    steps = max(400, int(down_s * 60))
    job = lab.submit("finetune", finetune_spec(dataset, steps, every=50))
    before = lab.wait_step(job["id"], 10, 120)
    lab.pg.stop()
    stopped = now()
    answers: list[tuple[str, int, str]] = []
    with lab.stack.client() as c:
        while (now() - stopped).total_seconds() < down_s:
            for method, path, body in (
                ("GET", f"/v1/jobs/{job['id']}", None),
                ("POST", "/v1/jobs", {"kind": "noop", "spec": {}}),
                ("GET", "/readyz", None),
            ):
                if len(answers) < 30:
                    r = c.request(method, path, json=body)
                    error = r.json().get("error", {}) if r.content else {}
                    answers.append((f"{method} {path}", r.status_code, str(error.get("type"))))
            time.sleep(0.5)
    lab.pg.start()
    back = now()
    # The worst case of the race as the database returns: a reconciler pass that comes
    # before the worker's heartbeat, finding the job's database lease long expired.
    publisher = JobPublisher(lab.settings())
    try:
        at_return = reconcile(lab.settings(), publisher)
    finally:
        publisher.close()

    def answering() -> bool:
        try:
            return httpx.get(
                f"{lab.stack.base_url}/v1/jobs/{job['id']}", headers=lab.stack.headers, timeout=5
            ).is_success
        except httpx.HTTPError:
            return False

    wait_for(answering, 60, "the API answering again", 0.1)
    done = lab.wait(job["id"], TERMINAL, 300)
    found = lab.audit([job["id"]])
    buffered = [e for e in lab.stack.events(job["id"]) if "buffered" in e["message"]]
    # recovered once the records buffered during the outage are in the database
    written = event_time(lab.database_url, job["id"], "buffered records", back)
    return Outcome(
        Figures.of(
            f"7. PostgreSQL stopped {down_s:g}s mid fine-tune",
            found,
            seconds(back, written),
            note="recover: buffered records written",
        ),
        found,
        {
            "job": done,
            "answers": answers,
            "step_before": before,
            "steps": steps,
            "metric_steps": lab.metric_steps(job["id"]),
            "buffered_events": buffered,
            "checkpoints": lab.checkpoints(job["id"]),
            "reconcile_at_return": at_return,
        },
    )


# 8 ------------------------------------------------------------------------------------------
def out_of_memory(lab: Lab, limit_extra_mb: int = 1024) -> Outcome:
    """A fine-tune whose first step needs more memory than the worker may allocate (its
    address space capped at its size + `limit_extra_mb`): the job fails with
    `out_of_memory`; the same worker then runs the next job. The worker is a fresh one: one
    that ran earlier scenarios keeps their freed memory mapped, and the training process it
    forks (which inherits the cap) could serve the step from that without growing past it,
    as it did once in a whole fault run."""
    lab.fleet(0)
    (worker,) = lab.fleet(1)
    long_text = " ".join(["the blue mug keeps coffee warm"] * 400)
    path = lab.workdir / "long.jsonl"
    path.write_text("\n".join(json.dumps({"text": long_text}) for _ in range(64)) + "\n")
    greedy = lab.upload(path)
    small = lab.text_dataset(40)
    limit_memory(worker.pid, limit_extra_mb * 2**20)
    try:
        oom = lab.submit(
            "finetune",
            finetune_spec(greedy, steps=2, every=100, batch_size=64, max_length=2048),
        )
        failed = lab.wait(oom["id"], TERMINAL, 180)
        after = lab.submit("finetune", finetune_spec(small, steps=4, every=100))
        done = lab.wait(after["id"], TERMINAL, 180)
    finally:
        limit_memory(worker.pid, None)
    found = lab.audit([oom["id"], after["id"]])
    failed_at = datetime.fromisoformat(failed["finished_at"]) if failed["finished_at"] else now()
    recover = seconds(failed_at, claimed_at(lab.database_url, after["id"], failed_at))
    return Outcome(
        Figures.of("8. out of memory in a job", found, recover, note="fails once: out_of_memory"),
        found,
        {"oom": failed, "next": done, "worker": worker.identity, "alive": worker.alive()},
    )


# 9 ------------------------------------------------------------------------------------------
def sigterm_mid_finetune(lab: Lab, steps: int = 400, every: int = 100) -> Outcome:
    """SIGTERM to the worker running a fine-tune: it checkpoints at the end of the step,
    hands the job back and exits; the other worker resumes from that checkpoint."""
    lab.fleet(2)
    dataset = lab.text_dataset()
    job = lab.submit("finetune", finetune_spec(dataset, steps, every))
    lab.wait_step(job["id"], 10, 120)
    owner = lab.audit([job["id"]]).claims(job["id"])[0]
    victim = next(p for p in lab.stack.workers if p.identity == owner)
    sent = now()
    victim.signal(signal.SIGTERM)
    exit_code = victim.popen.wait(60)
    victim.stop()  # reaps it and closes its log
    lab.stack.workers.remove(victim)
    done = lab.wait(job["id"], TERMINAL, 180)
    found = lab.audit([job["id"]])
    recover = seconds(sent, claimed_at(lab.database_url, job["id"], sent))
    return Outcome(
        Figures.of("9. SIGTERM to a worker mid fine-tune", found, recover),
        found,
        {"job": done, "exit_code": exit_code, "victim": owner, "every": every},
    )


# 25 -----------------------------------------------------------------------------------------
def commit_lost_at_finish(lab: Lab, steps: int = 20) -> Outcome:
    """The connection drops while a fine-tune's finishing COMMIT answers (tests/faults/inject:
    it lands, then raises). The worker retries, finds the job already succeeded by its own
    attempt, and keeps the registered model's files (it used to delete them as unregistered,
    leaving a succeeded job whose model is gone)."""
    lab.fleet(1)
    dataset = lab.text_dataset()
    spec = finetune_spec(dataset, steps=steps, every=steps)
    job = lab.submit("finetune", {**spec, "suffix": COMMIT_DROP_SUFFIX})
    done = lab.wait(job["id"], TERMINAL, 180)
    # the job reads succeeded as soon as the COMMIT lands; the worker (solo pool) settles
    # it after that: a no-op job behind it on the same worker ends only once it has
    barrier = lab.noop(0.0)
    lab.wait(barrier["id"], TERMINAL, 60)
    found = lab.audit([job["id"]])
    model = (done.get("result") or {}).get("model")
    files: list[str] = []
    if model is not None:
        from db.registry import get_model
        from db.session import session_scope

        with session_scope(lab.database_url, readonly=True) as session:
            registered = get_model(session, model)
            relative = None if registered is None else registered.path
        path = lab.stack.workdir / "data" / relative if relative else None
        files = sorted(p.name for p in path.iterdir()) if path and path.is_dir() else []
    logs = "".join(w.log.read_text(errors="replace") for w in lab.stack.workers)
    return Outcome(
        Figures.of("25. connection lost during a fine-tune's finishing COMMIT", found),
        found,
        {
            "job": done,
            "model": model,
            "files": files,
            "injected": "database unreachable while recording its result" in logs,
            "settled": "had committed though its COMMIT raised" in logs,
        },
    )


# 10 -----------------------------------------------------------------------------------------
def disk_full_on_checkpoint(lab: Lab, every: int = 20) -> Outcome:
    """The disk fills up (file writes fail past 256 KiB) once a fine-tune has a checkpoint:
    its next checkpoint fails half-written and leaves nothing behind, the last good one
    survives whole, and the job is retried (disk_full is transient) from it."""
    lab.fleet(0)
    worker = lab.special_worker()  # a fresh one: its log file stays far below the limit
    dataset = lab.text_dataset()
    job = lab.submit(
        "finetune", finetune_spec(dataset, steps=10 * every, every=every), max_attempts=5
    )
    wait_for(lambda: lab.checkpoints(job["id"]), 180, "first checkpoint", 0.1)
    limit_file_size(worker.pid, 256 * 1024)
    jobs_dir = lab.stack.workdir / "data" / "tenants" / "default" / "jobs"
    workdir = jobs_dir / job["id"] / "attempts" / "1" / "checkpoints"
    try:
        failed = lab.wait(job["id"], ("queued", *TERMINAL), 120)
        failed_at = now()
        on_disk = {
            p.name: sorted(f.name for f in p.iterdir()) if p.is_dir() else []
            for p in workdir.iterdir()
        }
    finally:
        limit_file_size(worker.pid, None)
    done = lab.wait(job["id"], TERMINAL, 180)
    found = lab.audit([job["id"]])
    recover = seconds(failed_at, claimed_at(lab.database_url, job["id"], failed_at))
    return Outcome(
        Figures.of("10. disk full while writing a checkpoint", found, recover),
        found,
        {"failed": failed, "on_disk_after_failure": on_disk, "job": done, "every": every},
    )


# 11 -----------------------------------------------------------------------------------------
def cancel_then_restart_workers(lab: Lab, at_step: int = 5) -> Outcome:
    """Cancel a fine-tune at step N and a queued job, then restart every worker: neither
    cancelled job runs again (the queued one's message is still in Redis and is dropped)."""
    lab.fleet(2)
    dataset = lab.text_dataset()
    # Holds the other worker however long the fine-tune takes to reach step N (on a busy
    # machine that can be many seconds), so the next job stays queued; cancelled at the end.
    blocker = lab.noop(600.0)
    training = lab.submit("finetune", finetune_spec(dataset, steps=5000, every=4000))
    lab.wait(blocker["id"], ("running",), 60)
    lab.wait_step(training["id"], at_step, 120)
    queued = lab.noop(0.1)
    assert lab.job(queued["id"])["status"] == "queued"
    with lab.stack.client() as c:
        for job in (queued, training):
            assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    cancelled = lab.wait(training["id"], TERMINAL, 60)
    for proc in list(lab.stack.workers):
        proc.stop()
        lab.stack.workers.remove(proc)
    lab.fleet(2)
    wait_for(
        lambda: lab.audit([queued["id"]]).drops[queued["id"]],
        60,
        "the cancelled job's message dropped",
        0.2,
    )
    with lab.stack.client() as c:
        assert c.post(f"/v1/jobs/{blocker['id']}/cancel").status_code == 202
    lab.wait(blocker["id"], TERMINAL, 60)
    sentinel = lab.noop(0.1)
    lab.wait(sentinel["id"], TERMINAL, 60)
    ids = [training["id"], queued["id"], blocker["id"], sentinel["id"]]
    found = lab.audit(ids)
    return Outcome(
        Figures.of("11. cancel running + queued, restart all workers", found),
        found,
        {
            "training": cancelled,
            "queued": lab.job(queued["id"]),
            "checkpoints": lab.checkpoints(training["id"]),
            "at_step": at_step,
            "ids": ids,
        },
    )


# 12 -----------------------------------------------------------------------------------------
def concurrent_idempotent_posts(lab: Lab, clients: int = 10) -> Outcome:
    """`clients` POSTs at once with one Idempotency-Key and body: one job."""
    lab.fleet(2)
    key = f"fault-{time.time_ns()}"
    body = {"kind": "noop", "spec": {"duration_s": 0.1}}
    barrier = threading.Barrier(clients)
    answers: list[tuple[int, str, str | None]] = []
    lock = threading.Lock()

    def post() -> None:
        with lab.stack.client() as c:
            barrier.wait()
            r = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        with lock:
            answers.append(
                (r.status_code, r.json().get("id", ""), r.headers.get("Idempotent-Replayed"))
            )

    threads = [threading.Thread(target=post) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = sorted({a[1] for a in answers})
    for job_id in ids:
        lab.wait(job_id, TERMINAL, 60)
    found = lab.audit(ids, idempotency_keys=[key])
    return Outcome(
        Figures.of(f"12. {clients} concurrent POSTs, one Idempotency-Key", found),
        found,
        {"answers": answers, "ids": ids},
    )


# 13 -----------------------------------------------------------------------------------------
def poison_job(lab: Lab, max_attempts: int = 2) -> Outcome:
    """A job that kills its worker every time it runs: after `max_attempts` lost workers it
    fails with `worker_lost` and never runs again. The supervisor (this function) restarts
    each dead worker."""
    lab.fleet(2)
    earlier = set(lab.deaths)
    job = lab.noop(POISON_DURATION_S, max_attempts=max_attempts)
    first_death: datetime | None = None

    def finished() -> dict[str, Any] | None:
        nonlocal first_death
        if lab.restart_dead_workers() and first_death is None:
            first_death = min(t for w, t in lab.deaths.items() if w not in earlier)
        current = lab.job(job["id"])
        return current if current["status"] in TERMINAL else None

    done: dict[str, Any] = wait_for(finished, 120, "the poison job to end", 0.1)
    sentinel = lab.noop(0.1)
    lab.wait(sentinel["id"], TERMINAL, 60)
    lab.restart_dead_workers()
    found = lab.audit([job["id"], sentinel["id"]])
    ended = datetime.fromisoformat(done["finished_at"]) if done["finished_at"] else None
    return Outcome(
        Figures.of(
            f"13. poison job (kills its worker), max_attempts {max_attempts}",
            found,
            seconds(first_death, ended) if first_death else None,
            note="recover: first crash -> failed",
        ),
        found,
        {"job": done, "claims": found.claims(job["id"]), "sentinel": sentinel["id"]},
    )


# deadlines ----------------------------------------------------------------------------------
def queued_job_expires(lab: Lab) -> Outcome:
    """A job still queued at its expires_at ends `expired` without ever starting."""
    lab.fleet(2)
    blockers = [lab.noop(4.0) for _ in range(2)]
    for b in blockers:
        lab.wait(b["id"], ("running",), 60)
    deadline = now() + timedelta(seconds=1)
    late = lab.noop(0.1, expires_at=deadline.isoformat())
    control = lab.noop(0.1)
    expired = lab.wait(late["id"], TERMINAL, 60)
    ids = [late["id"], control["id"], *(b["id"] for b in blockers)]
    for job_id in ids:
        lab.wait(job_id, TERMINAL, 60)
    found = lab.audit(ids)
    return Outcome(
        Figures.of("expires_at passes while queued", found),
        found,
        {"expired": expired, "control": lab.job(control["id"]), "deadline": deadline},
    )


def max_runtime_times_out(lab: Lab, max_runtime_s: float = 8.0) -> Outcome:
    """A fine-tune past its max_runtime_s checkpoints and fails with `timed_out`; a no-op
    job past it fails the same way."""
    lab.fleet(2)
    dataset = lab.text_dataset()
    training = lab.submit(
        "finetune", finetune_spec(dataset, steps=100_000, every=50_000), max_runtime_s=max_runtime_s
    )
    waiting = lab.noop(60.0, max_runtime_s=1.0)
    done = lab.wait(training["id"], TERMINAL, max_runtime_s + 120)
    noop = lab.wait(waiting["id"], TERMINAL, 60)
    found = lab.audit([training["id"], waiting["id"]])
    return Outcome(
        Figures.of("max_runtime_s passes while running", found),
        found,
        {
            "training": done,
            "noop": noop,
            "checkpoints": lab.checkpoints(training["id"]),
            "events": [e["message"] for e in lab.stack.events(training["id"])],
        },
    )


# issue 15 -----------------------------------------------------------------------------------
# 14-19: faults where leases, cancels and deadlines meet. Each checks files on disk and in the
# stack's file:// store as well as rows (Audit.stale_files, stale_rows, live_missing).


@contextmanager
def stopped_process(proc: Proc) -> Iterator[datetime]:
    """SIGSTOP `proc` (heartbeat and all, as a long GC pause or a partitioned host would)
    for the body; SIGCONT on the way out."""
    at = now()
    proc.signal(signal.SIGSTOP)
    try:
        yield at
    finally:
        proc.signal(signal.SIGCONT)


def _claims(lab: Lab, job_id: str) -> list[str]:
    return lab.audit([job_id]).claims(job_id)


def _claimed_by_another(lab: Lab, job_ids: list[str], first: str, timeout: float) -> bool:
    """Whether every job was claimed by a worker other than `first` within `timeout`."""

    def taken() -> bool:
        found = lab.audit(job_ids)
        return all(len(found.claims(j)) >= 2 and found.claims(j)[-1] != first for j in job_ids)

    try:
        return bool(wait_for(taken, timeout, "another worker took the jobs over", 0.2))
    except AssertionError:
        logger.warning("jobs %s not taken over within %.0fs", job_ids, timeout)
        return False


LOG_MARK = "-- SIGCONT --"


def _mark(proc: Proc) -> None:
    """A line in the worker's log (its log file is opened for appending) that `_woke`
    reads after."""
    with proc.log.open("a") as fh:
        fh.write(f"\n{LOG_MARK}\n")


def _woke(proc: Proc, timeout: float = 30) -> bool:
    """Whether the resumed worker logged anything after the mark: it ran again (a worker
    that never woke would prove nothing about stale writes)."""

    def logged() -> bool:
        return bool(proc.log.read_text(errors="replace").split(LOG_MARK)[-1].strip())

    try:
        return bool(wait_for(logged, timeout, "the resumed worker to log", 0.2))
    except AssertionError:
        return False


# 14 -----------------------------------------------------------------------------------------
def sigstop_past_lease_mid_finetune(lab: Lab, steps: int = 160, every: int = 20) -> Outcome:
    """SIGSTOP the worker running a fine-tune once it has a checkpoint and is half way to the
    next, past its lease; the other worker takes the job over and resumes it; then SIGCONT.
    The stale attempt's checkpoint, metric, model and output writes must all fail or vanish,
    on disk and in the store, and the live attempt succeeds."""
    lab.fleet(2)
    dataset = lab.text_dataset()
    job = lab.submit("finetune", finetune_spec(dataset, steps, every))
    wait_for(lambda: lab.checkpoints(job["id"]), 180, "first checkpoint", 0.1)
    lab.wait_step(job["id"], every + every // 2, 120)
    victim = lab.owner(job["id"])
    with stopped_process(victim) as stopped:
        taken_over = _claimed_by_another(lab, [job["id"]], victim.identity, 60)
        _mark(victim)
    woke = _woke(victim)
    jobs = lab.settle([job["id"]], 240)
    found = lab.audit([job["id"]])
    recover = seconds(stopped, claimed_at(lab.database_url, job["id"], stopped))
    return Outcome(
        Figures.of(
            "14. SIGSTOP a worker past its lease mid fine-tune, then SIGCONT", found, recover
        ),
        found,
        {
            "job": jobs[job["id"]],
            "victim": victim.identity,
            "taken_over": taken_over,
            "victim_alive": victim.alive(),
            "stale_worker_ran": woke,
            "checkpoints": lab.checkpoints(job["id"]),
            "metric_steps": lab.metric_steps(job["id"]),
        },
    )


# 15 -----------------------------------------------------------------------------------------
def sigstop_past_lease_mid_decode(lab: Lab, max_new_tokens: int = 1000) -> Outcome:
    """The same during a decode group of three generation jobs on one worker: SIGSTOP it past
    the jobs' leases, the other worker (held by a long no-op until then, so that the three
    decode together on the first) takes all three over, SIGCONT. Each job succeeds with one
    set of outputs, none written by the stale attempt."""
    lab.fleet(2)
    blocker = lab.noop(600.0)
    lab.wait(blocker["id"], ("running",), 60)
    holder = lab.owner(blocker["id"])
    prompts = ["The blue mug", "Fresh bread", "Our support team"]
    specs = [
        {"model": TINY_MODEL, "prompts": [p], "temperature": 0, "max_new_tokens": max_new_tokens}
        for p in prompts
    ]
    jobs = [lab.submit("generate", spec) for spec in specs]
    for job in jobs:
        lab.wait(job["id"], ("running",), 60)
    ids = [j["id"] for j in jobs]
    (first,) = (p for p in lab.stack.workers if p is not holder)
    grouped = {w for j in ids for w in _claims(lab, j)} == {first.identity}
    with stopped_process(first) as stopped:
        with lab.stack.client() as c:
            assert c.post(f"/v1/jobs/{blocker['id']}/cancel").status_code == 202
        taken_over = _claimed_by_another(lab, ids, first.identity, 60)
        _mark(first)
    woke = _woke(first)
    done = lab.settle([*ids, blocker["id"]], 240)
    found = lab.audit([*ids, blocker["id"]])
    claims = [claimed_at(lab.database_url, j, stopped) for j in ids]
    last = max((c for c in claims if c is not None), default=None)
    return Outcome(
        Figures.of(
            "15. SIGSTOP a worker past its lease mid decode group of 3, then SIGCONT",
            found,
            seconds(stopped, last),
        ),
        found,
        {
            "jobs": {j: done[j] for j in ids},
            "blocker": done[blocker["id"]],
            "grouped": grouped,
            "outputs": {j: lab.stack.outputs(j) for j in ids},
            "victim": first.identity,
            "taken_over": taken_over,
            "logs": "" if taken_over else lab.stack.logs(),
            "stale_worker_ran": woke,
            "max_new_tokens": max_new_tokens,
        },
    )


# 16 -----------------------------------------------------------------------------------------
def cancel_races_transient_error(lab: Lab) -> Outcome:
    """A running job is cancelled and fails with a transient error at once, before its
    heartbeat sees the cancel (tests/faults/inject: the no-op of
    TRANSIENT_ON_CANCEL_DURATION_S): it ends `cancelled`, not queued for ever."""
    lab.fleet(2)
    job = lab.noop(TRANSIENT_ON_CANCEL_DURATION_S, max_attempts=5)
    lab.wait(job["id"], ("running",), 60)
    with lab.stack.client() as c:
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    done = lab.settle([job["id"]], 20)
    found = lab.audit([job["id"]])
    return Outcome(
        Figures.of("16a. cancel racing a transient error", found, note=ended(found)),
        found,
        {"job": done[job["id"]], "events": [e["message"] for e in lab.stack.events(job["id"])]},
    )


def cancel_races_sigterm(lab: Lab) -> Outcome:
    """A running job is cancelled and its worker gets SIGTERM right after, before the
    heartbeat reads the cancel: the worker hands the job back as it shuts down. It ends
    `cancelled`, not queued for ever."""
    lab.fleet(2)
    job = lab.noop(60.0)
    lab.wait(job["id"], ("running",), 60)
    victim = lab.owner(job["id"])
    with lab.stack.client() as c:
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    victim.signal(signal.SIGTERM)
    exit_code = victim.popen.wait(60)
    victim.stop()
    lab.stack.workers.remove(victim)
    done = lab.settle([job["id"]], 20)
    found = lab.audit([job["id"]])
    return Outcome(
        Figures.of("16b. cancel racing a SIGTERM hand-back", found, note=ended(found)),
        found,
        {
            "job": done[job["id"]],
            "exit_code": exit_code,
            "events": [e["message"] for e in lab.stack.events(job["id"])],
        },
    )


def cancel_races_disk_full(lab: Lab) -> Outcome:
    """A fine-tune is cancelled while the disk is full (file writes fail past 256 KiB): the
    checkpoint it saves as it stops fails. It ends `cancelled`, not queued for ever, and the
    half-written save leaves nothing behind."""
    lab.fleet(0)
    worker = lab.special_worker()  # a fresh one: its log file stays far below the limit
    dataset = lab.text_dataset()
    job = lab.submit("finetune", finetune_spec(dataset, steps=5000, every=4000), max_attempts=5)
    lab.wait_step(job["id"], 5, 120)
    limit_file_size(worker.pid, 256 * 1024)
    try:
        with lab.stack.client() as c:
            assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        done = lab.settle([job["id"]], 30)
    finally:
        limit_file_size(worker.pid, None)
    found = lab.audit([job["id"]])
    return Outcome(
        Figures.of("16c. cancel racing a disk-full cancel checkpoint", found, note=ended(found)),
        found,
        {
            "job": done[job["id"]],
            "checkpoints": lab.checkpoints(job["id"]),
            "events": [e["message"] for e in lab.stack.events(job["id"])],
        },
    )


# 17 -----------------------------------------------------------------------------------------
def _poll_status(database_url: str, job_id: str, status: str, timeout: float) -> datetime:
    """When the job was first seen in `status`, read from the database every 2 ms (the API's
    polling is far too slow for a job that lasts under a second)."""
    from db.models import Job
    from db.session import session_scope

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(database_url, readonly=True) as session:
            if session.scalar(select(Job.status).where(Job.id == job_id)) == status:
                return now()
        time.sleep(0.002)
    raise AssertionError(f"job {job_id} not {status} after {timeout}s")


def cancel_just_after_claim(lab: Lab, delay_s: float = 0.01) -> Outcome:
    """Cancel a tiny fine-tune (a few steps: under a second) `delay_s` after it is claimed:
    it ends `cancelled` and registers no model (no row, no files on disk or in the store).
    Its worker has the default heartbeat (5 s, lease 15 s): the job ends before a heartbeat
    could read the cancel, so only the claim, the start of the runner and the finishing
    transaction can."""
    lab.fleet(0)
    lab.special_worker(heartbeat_interval_s="5", lease_ttl_s="15")
    dataset = lab.text_dataset(40)
    job = lab.submit("finetune", finetune_spec(dataset, steps=6, every=100))
    claimed = _poll_status(lab.database_url, job["id"], "running", 60)
    time.sleep(delay_s)
    with lab.stack.client() as c:
        cancel = c.post(f"/v1/jobs/{job['id']}/cancel")
    asked = now()
    done = lab.settle([job["id"]], 60)
    found = lab.audit([job["id"]])
    with lab.stack.client() as c:
        models = [m for m in c.get("/v1/models").json()["data"] if m.get("job_id") == job["id"]]
    return Outcome(
        Figures.of(
            f"17. cancel {delay_s * 1000:g} ms after claim of a sub-second fine-tune",
            found,
            note=ended(found),
        ),
        found,
        {
            "job": done[job["id"]],
            "cancel_status": cancel.status_code,
            "asked_after_claim_s": (asked - claimed).total_seconds(),
            "models": models,
        },
    )


# 18 -----------------------------------------------------------------------------------------
def _decode_group(lab: Lab, specs: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """Submit `specs` to one worker so that they decode as one group: the first holds the
    group open, the others join it. Returns the ids and whether all joined one worker."""
    (worker,) = lab.fleet(1)
    first = lab.submit("generate", specs[0])
    lab.wait(first["id"], ("running",), 60)
    rest = [lab.submit("generate", spec) for spec in specs[1:]]
    ids = [first["id"], *(j["id"] for j in rest)]
    for job_id in ids:
        lab.wait(job_id, ("running", *TERMINAL), 60)
    found = lab.audit(ids)
    return ids, all(found.claims(j)[:1] == [worker.identity] for j in ids)


def db_error_in_decode_group(lab: Lab, max_new_tokens: int = 150) -> Outcome:
    """Three generation jobs decode as one group; recording one's outputs fails with a
    database error (tests/faults/inject: a prompt holding DB_ERROR_MARKER). That job ends
    alone; the other two succeed."""
    specs = [
        {"model": TINY_MODEL, "prompts": [p], "temperature": 0, "max_new_tokens": n}
        for p, n in (
            ("The blue mug", max_new_tokens * 2),
            (f"Fresh bread {DB_ERROR_MARKER}", max_new_tokens),
            ("Our support team", max_new_tokens),
        )
    ]
    ids, grouped = _decode_group(lab, specs)
    done = lab.settle(ids, 120)
    found = lab.audit(ids)
    return Outcome(
        Figures.of(
            "18a. database error recording 1 of a decode group of 3", found, note=ended(found)
        ),
        found,
        {
            "jobs": [done[i] for i in ids],
            "grouped": grouped,
            "outputs": [lab.stack.outputs(i) for i in ids],
        },
    )


def _register_bad_adapter(lab: Lab) -> str:
    """A registered LoRA adapter on the tiny GPT-2 whose weights file is garbage."""
    from core.enums import FineTuneTask
    from db.registry import model_name, register_model
    from db.session import session_scope

    relative = f"tenants/default/models/bad-adapter-{time.time_ns()}"
    directory = lab.stack.workdir / "data" / relative
    directory.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": TINY_MODEL,
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["c_attn"],
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(b"\x00not safetensors\xff" * 64)
    name = model_name(TINY_MODEL, FineTuneTask.CAUSAL_LM, "bad-adapter", f"{time.time_ns():x}")
    with session_scope(lab.database_url) as session:
        noop = lab.noop(0.0)
        lab.wait(noop["id"], TERMINAL, 60)
        register_model(
            session,
            name=name,
            base_model=TINY_MODEL,
            task=FineTuneTask.CAUSAL_LM.value,
            method="lora",
            adapter=True,
            job_id=noop["id"],
            path=relative,
            labels=[],
            metrics={},
        )
    return name


def bad_adapter_in_decode_group(lab: Lab, max_new_tokens: int = 150) -> Outcome:
    """Three generation jobs on one base model decode as one group; one asks for a LoRA
    adapter whose weights are garbage. That job fails alone; the other two succeed."""
    bad = _register_bad_adapter(lab)
    specs = [
        {"model": model, "prompts": [p], "temperature": 0, "max_new_tokens": n}
        for model, p, n in (
            (TINY_MODEL, "The blue mug", max_new_tokens * 2),
            (bad, "Fresh bread", max_new_tokens),
            (TINY_MODEL, "Our support team", max_new_tokens),
        )
    ]
    ids, grouped = _decode_group(lab, specs)
    done = lab.settle(ids, 120)
    found = lab.audit(ids)
    return Outcome(
        Figures.of("18b. bad adapter in 1 of a decode group of 3", found, note=ended(found)),
        found,
        {
            "jobs": [done[i] for i in ids],
            "grouped": grouped,
            "outputs": [lab.stack.outputs(i) for i in ids],
        },
    )


# 19 -----------------------------------------------------------------------------------------
def runner_ignores_stop(lab: Lab, max_runtime_s: float = 1.0) -> Outcome:
    """A runner that never looks at its stop flag (tests/faults/inject: the no-op of
    IGNORE_STOP_DURATION_S sleeps that long) runs past its max_runtime_s: the job ends
    `failed` `timed_out` once the stop grace has passed, long before the runner would have
    returned, and the worker (the only one) goes on to the next job."""
    (worker,) = lab.fleet(1)
    hung = lab.noop(IGNORE_STOP_DURATION_S, max_runtime_s=max_runtime_s)
    lab.wait(hung["id"], ("running",), 60)
    following = lab.noop(0.1)
    done = lab.settle([hung["id"], following["id"]], IGNORE_STOP_DURATION_S + 60)
    found = lab.audit([hung["id"], following["id"]])
    ended = done[hung["id"]]
    ran_s = None
    if ended["started_at"] and ended["finished_at"]:
        ran_s = (
            datetime.fromisoformat(ended["finished_at"])
            - datetime.fromisoformat(ended["started_at"])
        ).total_seconds()
    grace = float(FAULT_SETTINGS["stop_grace_s"])
    return Outcome(
        Figures.of(
            f"19. runner ignores its stop flag past max_runtime_s {max_runtime_s:g}s "
            f"(stop_grace_s {grace:g})",
            found,
            ran_s,
            note="recover: start -> failed",
        ),
        found,
        {
            "hung": ended,
            "next": done[following["id"]],
            "ran_s": ran_s,
            "runner_s": IGNORE_STOP_DURATION_S,
            "worker": worker.identity,
            "worker_alive": worker.alive(),
            "next_claims": found.claims(following["id"]),
        },
    )


@contextmanager
def lab_stack(
    workdir: Path, tiny_model_dir: Path, *, pg: PostgresCluster, broker: RedisServer, name: str
) -> Iterator[Lab]:
    """A fault lab over a fresh database in `pg`: API, beat and two workers, sharing
    artifacts through a file:// store under `workdir` (so stale files are looked for there
    too)."""
    from tests.conftest import install_tiny_model

    database_url = pg.create_database(name)
    store = workdir / "store"
    store.mkdir(parents=True, exist_ok=True)
    stack = Stack(
        workdir, database_url, broker.url, storage_url=f"file://{store}", **FAULT_SETTINGS
    )
    stack.env.update(fault_env())
    install_tiny_model(tiny_model_dir, workdir / "data")
    lab = Lab(stack, broker, database_url, workdir, pg, store_dir=store)
    try:
        stack.start_api()
        stack.start_beat()
        lab.fleet(2)
        yield lab
    finally:
        stack.stop()
        from db.session import get_engine

        get_engine(database_url).dispose()


ALL: dict[str, Callable[..., Any]] = {
    "kill_pool_child": kill_pool_child,
    "visibility_timeout": visibility_timeout,
    "no_job_behind_busy_worker": no_job_behind_busy_worker,
    "redis_restart_without_persistence": redis_restart_without_persistence,
    "redis_unreachable": redis_unreachable,
    "postgres_down_during_finetune": postgres_down_during_finetune,
    "out_of_memory": out_of_memory,
    "sigterm_mid_finetune": sigterm_mid_finetune,
    "disk_full_on_checkpoint": disk_full_on_checkpoint,
    "cancel_then_restart_workers": cancel_then_restart_workers,
    "concurrent_idempotent_posts": concurrent_idempotent_posts,
    "poison_job": poison_job,
    "sigstop_past_lease_mid_finetune": sigstop_past_lease_mid_finetune,
    "sigstop_past_lease_mid_decode": sigstop_past_lease_mid_decode,
    "cancel_races_transient_error": cancel_races_transient_error,
    "cancel_races_sigterm": cancel_races_sigterm,
    "cancel_races_disk_full": cancel_races_disk_full,
    "cancel_just_after_claim": cancel_just_after_claim,
    "db_error_in_decode_group": db_error_in_decode_group,
    "bad_adapter_in_decode_group": bad_adapter_in_decode_group,
    "runner_ignores_stop": runner_ignores_stop,
}
