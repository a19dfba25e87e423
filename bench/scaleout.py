"""Issue 18 ("many hosts"): how throughput grows with worker hosts, and how soon a cut-off
host's job runs elsewhere.

Worker hosts are network namespaces on this machine (tests/support/netns.py); the control
host runs a private PostgreSQL, Redis, the API and beat (tests/support/hosts_stack.py), and
each worker host one `modelyard worker` (solo pool: one job at a time) with its own data dir.
This process is a client on the hosts' network: it submits through the API from a few
threads and reads the jobs' times from the database.

  1  200 no-op jobs of 0.5 s each, all submitted at once, with 1, 2, 4 and 8 worker hosts:
     jobs/s from the first submit to the last job's finish, and the ratio to hosts x the
     one-host figure (goal >= 0.9: the jobs wait, they do not compute). Also, per run, how
     the jobs spread over the hosts, a job's time on its worker (claim to finish), the gap
     between one job's finish and the next claim on the same worker, and how busy the
     machine's cores were. These runs use the product's default lease settings.
  2  generation jobs on the tiny GPT-2 (one prompt x 64 new tokens each, greedy, all
     submitted at once) with 1 and 2 worker hosts: jobs/s and tokens/s. Workers run torch
     with one thread (OMP_NUM_THREADS=1, as the test stacks do), so two hosts can use both
     of the machine's cores and no more. No goal.
  3  a worker host cut off (`Hosts.cut`) just after it claimed a 5 s no-op job, with the
     short lease settings of tests/e2e/test_hosts.py: time from the cut to the job's second
     "claimed by" event (on the other host), against lease TTL + reconcile period.

    python -m bench.scaleout [--quick] [--repeats N] [--only noop,generation,takeover]
                             [--new-tokens N]
                             [--json PATH] [--workdir DIR]

Needs root and `ip` (network namespaces); takes several minutes, so it is not part of
`make bench`. --quick (40 no-op jobs, 1 and 2 hosts, 16 generation jobs, one cut) checks
that it runs; its figures are not the ones to quote. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bench.common import Stats, process_tree_cpu_s
from bench.generation import PROMPTS, TINY, generate_spec, install_model
from core.settings import Settings
from db.models import Job, JobEvent
from db.session import session_scope
from tests.support.hosts_stack import SHORT_LEASES, HostsStack, hosts_stack
from tests.support.netns import Host, Hosts, hosts
from tests.support.tiny_model import build_tiny_gpt2

logger = logging.getLogger(__name__)

HOST_COUNTS = (1, 2, 4, 8)
NOOP_JOBS = 200
NOOP_S = 0.5
GENERATION_JOBS = 128
NEW_TOKENS = 64
CUT_JOB_S = 5.0
SUBMIT_THREADS = 8
GOAL = 0.9
SECTIONS = ("noop", "generation", "takeover")
FAILED = frozenset({"failed", "cancelled", "expired"})

# The product's defaults for what the test stacks shorten (tests/support/harness.Stack).
DEFAULT_LEASES = {
    name: str(Settings.model_fields[name].default)
    for name in (
        "lease_ttl_s",
        "heartbeat_interval_s",
        "reconcile_period_s",
        "republish_grace_s",
        "retry_backoff_s",
    )
}
# Benchmarks send far more than a tenant's default rate and queue.
LIMITS = {"requests_per_minute": "100000000", "max_queued_jobs": "100000000"}


@dataclass(frozen=True)
class Round:
    """One batch of jobs submitted at once and run to the end."""

    hosts: int
    jobs: int
    seconds: float  # first submit -> last job finished
    submit_s: float  # first submit -> last submit answered
    first_claim_s: float  # first submit -> first claim
    per_host: dict[str, int]  # jobs claimed (finally) per host
    on_worker_s: float  # mean claim -> finish of a job
    gap_s: float  # mean finish -> next claim on the same worker (its dispatch cost)
    attempts_over_one: int  # jobs claimed more than once
    cores: tuple[float, float, float, float]  # busy cores: control, workers, client, machine
    load: tuple[float, float, float]  # os.getloadavg() at the end
    tokens: int = 0  # generation rounds: completion tokens produced

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds


@dataclass(frozen=True)
class Takeover:
    victim: str
    survivor: str
    lease_left_s: float  # the victim's lease expiry (database clock) minus the cut
    takeover_s: float  # the second claim minus the cut
    status: str
    attempts: int


@dataclass
class Figures:
    noop: list[Round] = field(default_factory=list)
    generation: list[Round] = field(default_factory=list)
    takeovers: list[Takeover] = field(default_factory=list)
    bound_s: float = 0.0


class CpuMeter:
    """CPU used between start and `cores()`, as busy cores: the processes of the control
    host (API, beat, PostgreSQL, Redis), those of the worker hosts, this process (the
    submitting and polling client), and the whole machine (/proc/stat: other engineers'
    work too)."""

    def __init__(self, made: Hosts) -> None:
        self._made = made
        self._start = self._read()

    @staticmethod
    def _pids(hosts: Sequence[Host]) -> list[int]:
        return [
            int(pid)
            for host in hosts
            for pid in subprocess.run(
                ["ip", "netns", "pids", host.netns], capture_output=True, text=True, check=False
            ).stdout.split()
        ]

    def _read(self) -> tuple[float, ...]:
        own = os.times()
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (
            process_tree_cpu_s(self._pids([self._made.control])),
            process_tree_cpu_s(self._pids(self._made.workers)),
            own.user + own.system,
            (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"),
            time.monotonic(),
        )

    def cores(self) -> tuple[float, float, float, float]:
        """(control host, worker hosts, client, machine) busy cores since the start."""
        end = self._read()
        wall = end[4] - self._start[4]
        control, workers, client, machine = ((end[i] - self._start[i]) / wall for i in range(4))
        return control, workers, client, machine


def submit_all(stack: HostsStack, bodies: Sequence[dict[str, Any]]) -> list[str]:
    """POST every body to /v1/jobs from SUBMIT_THREADS client threads; the job ids."""
    shares = [list(bodies[i::SUBMIT_THREADS]) for i in range(SUBMIT_THREADS)]

    def client(share: list[dict[str, Any]]) -> list[str]:
        ids: list[str] = []
        with stack.client() as http:
            for body in share:
                resp = http.post("/v1/jobs", json=body)
                if resp.status_code != 202:
                    raise RuntimeError(f"submit refused: {resp.status_code} {resp.text[:300]}")
                ids.append(str(resp.json()["id"]))
        return ids

    with ThreadPoolExecutor(SUBMIT_THREADS) as pool:
        return [job_id for ids in pool.map(client, shares) for job_id in ids]


def wait_succeeded(database_url: str, ids: Sequence[str], timeout: float) -> None:
    wanted = list(ids)
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(database_url, readonly=True) as s:
            rows = s.execute(select(Job.id, Job.status).where(Job.id.in_(wanted))).all()
        bad = [f"{job_id} {status}" for job_id, status in rows if status in FAILED]
        if bad:
            raise RuntimeError(f"jobs did not succeed: {bad[:5]}")
        if sum(status == "succeeded" for _, status in rows) == len(wanted):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(wanted)} jobs not all succeeded after {timeout:.0f} s")
        time.sleep(0.1)


def claims(database_url: str, job_ids: Sequence[str]) -> dict[str, list[tuple[str, datetime]]]:
    """Each job's claims, in order: (worker identity host:pid, when)."""
    found: dict[str, list[tuple[str, datetime]]] = defaultdict(list)
    with session_scope(database_url, readonly=True) as s:
        rows = s.execute(
            select(JobEvent.job_id, JobEvent.data, JobEvent.created_at)
            .where(JobEvent.job_id.in_(list(job_ids)), JobEvent.message.like("claimed by %"))
            .order_by(JobEvent.id)
        ).all()
    for job_id, data, at in rows:
        if "worker" in (data or {}):
            found[job_id].append((str(data["worker"]), at))
    return found


def run_round(
    stack: HostsStack, bodies: Sequence[dict[str, Any]], timeout: float
) -> tuple[Round, list[str]]:
    """Submit `bodies` at once, wait for every job to succeed, and read their times."""
    meter = CpuMeter(stack.hosts)
    start = datetime.now(UTC)
    ids = submit_all(stack, bodies)
    submitted = datetime.now(UTC)
    wait_succeeded(stack.database_url, ids, timeout)
    cores = meter.cores()
    with session_scope(stack.database_url, readonly=True) as s:
        rows = s.execute(
            select(Job.id, Job.started_at, Job.finished_at, Job.attempts).where(Job.id.in_(ids))
        ).all()
    claimed = claims(stack.database_url, ids)
    spans: dict[str, tuple[datetime, datetime]] = {}
    for job_id, started, finished, _ in rows:
        assert started is not None and finished is not None, job_id
        spans[job_id] = (started, finished)
    per_worker: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for job_id, span in spans.items():
        per_worker[claimed[job_id][-1][0]].append(span)
    gaps = [
        (b[0] - a[1]).total_seconds()
        for worker_spans in per_worker.values()
        for a, b in zip(sorted(worker_spans), sorted(worker_spans)[1:], strict=False)
    ]
    per_host: Counter[str] = Counter()
    for worker, worker_spans in per_worker.items():
        per_host[stack.host_named(worker).name] += len(worker_spans)
    done = Round(
        hosts=sum(p.alive() for p in stack.workers),
        jobs=len(ids),
        seconds=(max(f for _, f in spans.values()) - start).total_seconds(),
        submit_s=(submitted - start).total_seconds(),
        first_claim_s=(min(at for c in claimed.values() for _, at in c) - start).total_seconds(),
        per_host=dict(sorted(per_host.items())),
        on_worker_s=sum((f - b).total_seconds() for b, f in spans.values()) / len(spans),
        gap_s=sum(gaps) / len(gaps) if gaps else 0.0,
        attempts_over_one=sum(row.attempts > 1 for row in rows),
        cores=cores,
        load=os.getloadavg(),
    )
    return done, ids


def keep_workers(stack: HostsStack, made: Hosts, count: int) -> None:
    """A live worker on each of the first `count` worker hosts and none on the others."""
    for i, host in enumerate(made.workers):
        worker = stack.worker_of(host)
        if i < count and worker is None:
            stack.start_worker_on(host)
        elif i >= count and worker is not None:
            worker.stop()
            stack.workers.remove(worker)


def warm_up(stack: HostsStack, count: int, body: dict[str, Any]) -> None:
    """A few short jobs first, so every worker has its connections (and model) open."""
    wait_succeeded(stack.database_url, submit_all(stack, [body] * (2 * count)), 300)


def noop_body(duration_s: float) -> dict[str, Any]:
    return {"kind": "noop", "spec": {"duration_s": duration_s}}


def generation_bodies(jobs: int, new_tokens: int) -> list[dict[str, Any]]:
    return [
        {"kind": "generate", "spec": generate_spec(TINY, [PROMPTS[i % len(PROMPTS)]], new_tokens)}
        for i in range(jobs)
    ]


def completion_tokens(stack: HostsStack, ids: Sequence[str]) -> int:
    return sum(out["completion_tokens"] for job_id in ids for out in stack.outputs(job_id))


@contextmanager
def lab(
    workers: int, workdir: Path, settings: dict[str, str]
) -> Iterator[tuple[Hosts, HostsStack]]:
    with (
        hosts(workers, workdir / "hosts") as made,
        hosts_stack(made, workdir / "logs", **settings, **LIMITS) as stack,
    ):
        yield made, stack


def throughput(args: argparse.Namespace, workdir: Path, figures: Figures) -> None:
    """Sections 1 and 2 on one set of hosts at the default lease settings."""
    counts = (1, 2) if args.quick or "noop" not in args.only else HOST_COUNTS
    noop_jobs = 40 if args.quick else args.noop_jobs
    generation_jobs = 16 if args.quick else args.generation_jobs
    with lab(max(counts), workdir / "throughput", DEFAULT_LEASES) as (made, stack):
        model = build_tiny_gpt2(workdir / "model" / TINY)
        for host in made.all:
            install_model(model, host.data_dir / "data" / "models" / TINY)
        for repeat in range(args.repeats if "noop" in args.only else 0):
            # alternate the order, so a drift of the machine's load hits every count alike
            for count in sorted(counts, reverse=repeat % 2 == 0):
                keep_workers(stack, made, count)
                warm_up(stack, count, noop_body(0))
                logger.info("%d no-op jobs on %d worker host(s)", noop_jobs, count)
                done, _ = run_round(stack, [noop_body(NOOP_S)] * noop_jobs, 600)
                logger.info("%d hosts: %.2f jobs/s", count, done.jobs_per_s)
                figures.noop.append(done)
        for repeat in range(args.repeats if "generation" in args.only else 0):
            for count in sorted((1, 2), reverse=repeat % 2 == 1):
                keep_workers(stack, made, count)
                warm_up(stack, count, generation_bodies(1, args.new_tokens)[0])
                logger.info("%d generation jobs on %d worker host(s)", generation_jobs, count)
                bodies = generation_bodies(generation_jobs, args.new_tokens)
                done, ids = run_round(stack, bodies, 900)
                done = Round(**{**asdict(done), "tokens": completion_tokens(stack, ids)})
                logger.info("%d hosts: %.2f generation jobs/s", count, done.jobs_per_s)
                figures.generation.append(done)


def one_takeover(stack: HostsStack, made: Hosts) -> Takeover:
    for host in made.workers:
        made.restore(host)
        if stack.worker_of(host) is None:
            stack.start_worker_on(host)
    (job_id,) = submit_all(stack, [noop_body(CUT_JOB_S)])
    stack.wait_status(job_id, ("running",), 60)
    first = claims(stack.database_url, [job_id])[job_id][0][0]
    victim = stack.host_named(first)
    survivor = next(h for h in made.workers if h is not victim)
    with session_scope(stack.database_url, readonly=True) as s:
        expires = s.scalar(select(Job.lease_expires_at).where(Job.id == job_id))
    assert expires is not None
    cut_at = datetime.now(UTC)
    with made.cut_off(victim):
        deadline = time.monotonic() + 60
        while len(taken := claims(stack.database_url, [job_id])[job_id]) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not claimed again within 60 s of the cut")
            time.sleep(0.05)
        done = stack.wait_status(job_id, ("succeeded", "failed", "cancelled", "expired"), 60)
    return Takeover(
        victim=victim.name,
        survivor=stack.host_named(taken[1][0]).name if len(taken) > 1 else survivor.name,
        lease_left_s=(expires - cut_at).total_seconds(),
        takeover_s=(taken[1][1] - cut_at).total_seconds(),
        status=str(done["status"]),
        attempts=int(done["attempts"]),
    )


def takeovers(args: argparse.Namespace, workdir: Path, figures: Figures) -> None:
    """Section 3 on two worker hosts at the tests' short lease settings."""
    figures.bound_s = float(SHORT_LEASES["lease_ttl_s"]) + float(SHORT_LEASES["reconcile_period_s"])
    with lab(2, workdir / "takeover", SHORT_LEASES) as (made, stack):
        warm_up(stack, 2, noop_body(0))
        for i in range(1 if args.quick else args.cuts):
            done = one_takeover(stack, made)
            logger.info("cut %d: %s", i + 1, done)
            figures.takeovers.append(done)


def summarize(figures: Figures, seconds: float, quick: bool) -> dict[str, Any]:
    by_count: dict[int, list[Round]] = defaultdict(list)
    for r in figures.noop:
        by_count[r.hosts].append(r)
    one = Stats([r.jobs_per_s for r in by_count[1]]).median if 1 in by_count else 0.0
    noop = {
        count: {
            "jobs_per_s": Stats([r.jobs_per_s for r in rounds]).median,
            "runs": [r.jobs_per_s for r in rounds],
            "ratio": Stats([r.jobs_per_s for r in rounds]).median / (count * one) if one else 0.0,
            "ideal_jobs_per_s": count / NOOP_S,
        }
        for count, rounds in sorted(by_count.items())
    }
    return {
        "when": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "quick": quick,
        "seconds": round(seconds, 1),
        "noop": noop,
        "noop_rounds": [asdict(r) for r in figures.noop],
        "generation_rounds": [asdict(r) for r in figures.generation],
        "takeovers": [asdict(t) for t in figures.takeovers],
        "takeover_bound_s": figures.bound_s,
        "default_leases": DEFAULT_LEASES,
        "short_leases": SHORT_LEASES,
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"\nScale-out over worker hosts, {r['when']}, {r['machine']}")
    print(f"({'quick run' if r['quick'] else 'full run'} in {r['seconds'] / 60:.1f} min)\n")
    if r["noop_rounds"]:
        print_noop(r)
    if r["generation_rounds"]:
        print_generation(r)
    if r["takeovers"]:
        print_takeovers(r)


def print_noop(r: dict[str, Any]) -> None:
    print(f"1. {NOOP_S} s no-op jobs, all submitted at once (goal: ratio >= {GOAL})\n")
    print(
        "| worker hosts | jobs/s (runs) | ideal | ratio to hosts x 1 host | met | jobs per host "
        "| all submitted after | claim -> finish | finish -> next claim "
        "| busy cores: control host / worker hosts / client / machine | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rounds: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for x in r["noop_rounds"]:
        rounds[x["hosts"]].append(x)
    for count, n in r["noop"].items():
        xs = rounds[count]
        runs = ", ".join(f"{v:.2f}" for v in n["runs"])
        met = "-" if count == 1 else ("yes" if n["ratio"] >= GOAL else "NO")
        spread = ", ".join(
            f"{min(x['per_host'].values())}-{max(x['per_host'].values())}" for x in xs
        )
        print(
            f"| {count} | {n['jobs_per_s']:.2f} ({runs}) | {n['ideal_jobs_per_s']:.0f} "
            f"| {n['ratio']:.2f} | {met} | {spread} | {_mean(xs, 'submit_s'):.1f} s "
            f"| {_mean(xs, 'on_worker_s') * 1000:.0f} ms | {_mean(xs, 'gap_s') * 1000:.0f} ms "
            f"| {_cores(xs)} | {xs[-1]['load'][0]:.1f} |"
        )


def print_generation(r: dict[str, Any]) -> None:
    print(f"\n2. generation jobs, tiny GPT-2, 1 prompt x {r['new_tokens']} new tokens each\n")
    print(
        "| worker hosts | jobs | jobs/s | tokens/s | claim -> finish "
        "| busy cores: control host / worker hosts / client / machine | load |"
    )
    print("|---|---|---|---|---|---|---|")
    for x in sorted(r["generation_rounds"], key=lambda x: x["hosts"]):
        print(
            f"| {x['hosts']} | {x['jobs']} | {x['jobs'] / x['seconds']:.2f} "
            f"| {x['tokens'] / x['seconds']:.0f} | {x['on_worker_s']:.2f} s "
            f"| {_cores([x])} | {x['load'][0]:.1f} |"
        )


def print_takeovers(r: dict[str, Any]) -> None:
    print(
        f"\n3. a worker host cut off mid job: cut -> claimed on the other host "
        f"(within lease TTL + reconcile period = {r['takeover_bound_s']:.0f} s?)\n"
    )
    print("| cut | victim -> survivor | lease left at the cut | cut -> second claim | within |")
    print("|---|---|---|---|---|")
    for i, t in enumerate(r["takeovers"], 1):
        within = "yes" if t["takeover_s"] <= r["takeover_bound_s"] else "NO"
        print(
            f"| {i} | {t['victim']} -> {t['survivor']} | {t['lease_left_s']:.2f} s "
            f"| {t['takeover_s']:.2f} s | {within} |"
        )


def _mean(rounds: list[dict[str, Any]], key: str) -> float:
    return sum(float(x[key]) for x in rounds) / len(rounds)


def _cores(rounds: list[dict[str, Any]]) -> str:
    return " / ".join(f"{sum(x['cores'][i] for x in rounds) / len(rounds):.2f}" for i in range(4))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each host count")
    parser.add_argument("--noop-jobs", type=int, default=NOOP_JOBS)
    parser.add_argument("--generation-jobs", type=int, default=GENERATION_JOBS)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="per generation job")
    parser.add_argument("--cuts", type=int, default=3)
    parser.add_argument(
        "--only",
        type=lambda v: set(v.split(",")),
        default=set(SECTIONS),
        help=f"comma-separated sections: {','.join(SECTIONS)}",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep hosts' logs here")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
    figures = Figures()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="modelyard-scaleout-") as tmp:
        workdir = args.workdir or Path(tmp)
        if args.only & {"noop", "generation"}:
            throughput(args, workdir, figures)
        if "takeover" in args.only:
            takeovers(args, workdir, figures)
    result = summarize(figures, time.perf_counter() - started, args.quick)
    result["new_tokens"] = args.new_tokens
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
