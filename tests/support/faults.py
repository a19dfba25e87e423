"""Counting what a fault did to jobs, from the database and the files: the figures of
tests/faults and bench/faults.py (lost, stuck, concurrent duplicate executions, duplicate
effects, stale writes surviving, steps redone).

Attempts are read from job events, one per claim (`running`, data.worker), numbered by the
claim (data.attempt when the claim names it, else the claims counted in order: each claim
adds one to the job's `attempts`). Worker identities are not attempts: `host:pid` repeats
across container restarts and an in-place restart (exec) keeps the pid. An attempt ends at
the first of: an event its worker wrote when it ended (data.by: finished, retried, handed
back, stopped after losing its lease), the job's next status change (the reconciler taking
the job back from a lost or stalled worker ends that attempt's hold on it), its worker's
next claim (a process runs one attempt at a time) or its process's death (`deaths`); an
attempt with none of these is still running. Two attempts of one job whose spans overlap
are a concurrent duplicate execution.

Stale writes are what an attempt that does not hold the job wrote and kept: rows (metrics,
checkpoints, outputs) written after the job's final commit, and files. A job's files live
under `<data dir>/tenants/<t>/jobs/<job>/` (checkpoint dirs, the model dir, staging dirs,
and `attempts/<n>/...` where attempts have directories of their own) and, with a shared
store, under the same paths there. The live files are the ones the job's rows name: the
registered model's path and the recorded checkpoints' paths. A file anywhere else in the
job's tree (other than the step marker a resume reads) survived from an attempt that did
not win; a file inside a live path changed after the final commit was overwritten by one.
A live path that a resume or a reader needs (the registered model, the newest recorded
checkpoint) that is missing was removed by one (`live_missing`); older checkpoints go by
rotation. Where rows carry the attempt that wrote them (an `attempt` column), a row written
after its attempt's span ended is stale too, and names no live file.
"""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from db.models import Checkpoint, Job, JobEvent, Metric, Output, RegisteredModel
from db.session import session_scope

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})


# Files a job's tree may hold outside the live paths: the step marker the runner rewrites
# after every step (a resuming attempt reads it to count the steps it redoes).
BOOKKEEPING = frozenset({"last_step"})
# An attempt's control files (workers/training/control.py): how the worker and its training
# processes talked (a stop request, progress, pids, how each rank ended); no row names them.
BOOKKEEPING_DIRS = frozenset({"control"})


@dataclass(frozen=True)
class Attempt:
    number: int  # the fencing token: the job's `attempts` after this claim
    worker: str
    start: datetime
    end: datetime | None  # None: still running when audited


@dataclass(frozen=True)
class StaleFile:
    job_id: str
    where: str  # "disk" | "store"
    path: str  # relative to the data dir (or the store's root)
    why: str  # "not live" | "changed after the final commit"


@dataclass
class Audit:
    statuses: dict[str, str]
    attempts: dict[str, list[Attempt]]
    lost: int
    concurrent: int
    duplicates: dict[str, int]
    steps_redone: int | None
    drops: dict[str, int] = field(default_factory=dict)  # duplicate deliveries dropped per job
    stuck: int = 0  # not finished, and nothing will move it: queued with a cancel, lease expired
    stale_rows: dict[str, int] = field(default_factory=dict)  # rows written after the final commit
    stale_files: list[StaleFile] = field(default_factory=list)
    live_missing: list[str] = field(default_factory=list)  # live paths (rows name them) gone

    @property
    def duplicate_effects(self) -> int:
        return sum(self.duplicates.values())

    @property
    def stale_writes(self) -> int:
        return sum(self.stale_rows.values()) + len(self.stale_files) + len(self.live_missing)

    def claims(self, job_id: str) -> list[str]:
        return [a.worker for a in self.attempts.get(job_id, [])]


@dataclass
class Figures:
    """One row of the fault table."""

    scenario: str
    submitted: int
    lost: int
    concurrent: int
    duplicate_effects: int
    stuck: int = 0
    stale_writes: int = 0
    steps_redone: int | None = None
    recover_s: float | None = None
    note: str = ""

    @classmethod
    def of(
        cls, scenario: str, audit: Audit, recover_s: float | None = None, note: str = ""
    ) -> Figures:
        return cls(
            scenario=scenario,
            submitted=len(audit.statuses),
            lost=audit.lost,
            concurrent=audit.concurrent,
            duplicate_effects=audit.duplicate_effects,
            stuck=audit.stuck,
            stale_writes=audit.stale_writes,
            steps_redone=audit.steps_redone,
            recover_s=recover_s,
            note=note,
        )


def _attempts(events: list[JobEvent], deaths: Mapping[str, datetime]) -> list[Attempt]:
    claims: list[tuple[int, str, datetime, int]] = []  # (attempt, worker, start, event index)
    for index, event in enumerate(events):
        data = event.data or {}
        if event.type == "status" and data.get("status") == "running" and data.get("worker"):
            number = int(data.get("attempt") or len(claims) + 1)
            claims.append((number, str(data["worker"]), event.created_at, index))
    found: list[Attempt] = []
    for number, worker, start, index in claims:
        end: datetime | None = None
        for event in events[index + 1 :]:
            data = event.data or {}
            # its worker's own end event, naming this attempt where events carry one
            own_end = data.get("by") == worker and data.get("attempt", number) == number
            next_claim = event.type == "status" and data.get("worker") == worker
            if event.type == "status" or own_end or next_claim:
                end = event.created_at
                break
        died = deaths.get(worker)
        if died is not None and died >= start and (end is None or died < end):
            end = died
        found.append(Attempt(number, worker, start, end))
    return sorted(found, key=lambda a: a.start)


def _overlaps(attempts: list[Attempt], now: datetime) -> int:
    count = 0
    for i, a in enumerate(attempts):
        for b in attempts[i + 1 :]:
            if max(a.start, b.start) < min(a.end or now, b.end or now):
                count += 1
    return count


def _inside(path: Path, roots: Collection[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _job_trees(root: Path, job: Job) -> list[Path]:
    return [
        tree
        for tree in (root / "tenants" / job.tenant_id / "jobs" / job.id, root / "jobs" / job.id)
        if tree.is_dir()
    ]


def _stale_in(
    where: str, root: Path, job: Job, live: Collection[str], finished: datetime | None
) -> list[StaleFile]:
    """Files of `job` under `root` (the data dir or the store) that no live path names, or
    that changed after the job's final commit."""
    live_paths = [root / p for p in live]
    stale: list[StaleFile] = []
    for tree in _job_trees(root, job):
        for file in sorted(p for p in tree.rglob("*") if p.is_file() or p.is_symlink()):
            relative = file.relative_to(root).as_posix()
            if not _inside(file, live_paths):
                bookkeeping = file.name in BOOKKEEPING or BOOKKEEPING_DIRS & set(file.parts)
                if not bookkeeping:
                    stale.append(StaleFile(job.id, where, relative, "not live"))
                continue
            changed = datetime.fromtimestamp(file.lstat().st_mtime, UTC)
            if finished is not None and changed > finished:
                stale.append(StaleFile(job.id, where, relative, "changed after the final commit"))
    return stale


ROW_TABLES: tuple[tuple[str, Any], ...] = (
    ("metrics", Metric),
    ("checkpoints", Checkpoint),
    ("outputs", Output),
)


def _stale_row(row: Any, job: Job, spans: Mapping[int, Attempt]) -> bool:
    """Written after the job's final commit, or (rows that name their attempt) by an
    attempt after it had lost the job."""
    if job.finished_at is not None and row.created_at > job.finished_at:
        return True
    attempt = getattr(row, "attempt", None)
    if attempt is None:
        return False
    span = spans.get(int(attempt))
    return span is None or (span.end is not None and row.created_at > span.end)


def _stale_rows(
    session: Any, jobs: Mapping[str, Job], attempts: Mapping[str, list[Attempt]]
) -> tuple[dict[str, int], set[int]]:
    """Stale rows per table, and the ids of the stale checkpoint rows."""
    counts = {name: 0 for name, _ in ROW_TABLES}
    stale_checkpoints: set[int] = set()
    for job in jobs.values():
        spans = {a.number: a for a in attempts.get(job.id, [])}
        for name, table in ROW_TABLES:
            for row in session.scalars(select(table).where(table.job_id == job.id)):
                if _stale_row(row, job, spans):
                    counts[name] += 1
                    if table is Checkpoint:
                        stale_checkpoints.add(row.id)
    return counts, stale_checkpoints


def _stuck(job: Job, now: datetime) -> bool:
    if job.status == "queued":
        return bool(job.cancel_requested)
    if job.status == "running":
        return job.lease_expires_at is None or job.lease_expires_at < now
    return False


def _dup_groups(session: Any, columns: tuple[Any, ...], job_ids: list[str]) -> int:
    """Rows beyond the first in each group of `columns` (the first column is the job id)."""
    counted = (
        select(func.count().label("n"))
        .where(columns[0].in_(job_ids))
        .group_by(*columns)
        .having(func.count() > 1)
        .subquery()
    )
    extra = session.scalar(select(func.coalesce(func.sum(counted.c.n - 1), 0)))
    return int(extra or 0)


def audit(
    database_url: str,
    job_ids: Collection[str],
    *,
    deaths: Mapping[str, datetime] | None = None,
    idempotency_keys: Collection[str] = (),
    data_dir: Path | None = None,
    store_dir: Path | None = None,
) -> Audit:
    """What happened to `job_ids`; with `data_dir` (and `store_dir`, a file:// store's
    root) the job trees on disk (and in the store) are checked for stale files."""
    ids = list(job_ids)
    now = datetime.now(UTC)
    with session_scope(database_url, readonly=True) as s:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        events: dict[str, list[JobEvent]] = {i: [] for i in ids}
        for event in s.scalars(
            select(JobEvent).where(JobEvent.job_id.in_(ids)).order_by(JobEvent.id)
        ):
            events[event.job_id].append(event)
        duplicates = {
            "outputs": _dup_groups(
                s, (Output.job_id, Output.prompt_index, Output.sequence_index), ids
            ),
            "metrics": _dup_groups(s, (Metric.job_id, Metric.name, Metric.step), ids),
            "checkpoints": _dup_groups(s, (Checkpoint.job_id, Checkpoint.step), ids),
            "models": _dup_groups(s, (RegisteredModel.job_id,), ids),
        }
        finished_twice = 0
        for job_events in events.values():
            ends = [
                e for e in job_events if e.type == "status" and e.data.get("status") in TERMINAL
            ]
            finished_twice += max(len(ends) - 1, 0)
        duplicates["terminal states"] = finished_twice
        if idempotency_keys:
            per_key = s.execute(
                select(Job.idempotency_key, func.count())
                .where(Job.idempotency_key.in_(list(idempotency_keys)))
                .group_by(Job.idempotency_key)
            ).all()
            duplicates["jobs per idempotency key"] = sum(max(n - 1, 0) for _, n in per_key)
        statuses = {i: (jobs[i].status if i in jobs else "missing") for i in ids}
        redone = [
            int(j.result["steps_redone"])
            for j in jobs.values()
            if j.result and isinstance(j.result.get("steps_redone"), int)
        ]
        drops = {
            i: sum(1 for e in evs if e.message.startswith("delivery dropped"))
            for i, evs in events.items()
        }
        attempts = {i: _attempts(evs, deaths or {}) for i, evs in events.items()}
        stale_rows, stale_checkpoints = _stale_rows(s, jobs, attempts)
        stale_files: list[StaleFile] = []
        live_missing: list[str] = []
        if data_dir is not None:
            for job in jobs.values():
                if job.status not in TERMINAL:
                    continue
                checkpoints = [
                    c
                    for c in s.scalars(
                        select(Checkpoint)
                        .where(Checkpoint.job_id == job.id)
                        .order_by(Checkpoint.step)
                    )
                    if c.id not in stale_checkpoints
                ]
                models = list(
                    s.scalars(select(RegisteredModel.path).where(RegisteredModel.job_id == job.id))
                )
                needed = [*models, *(c.path for c in checkpoints[-1:])]
                live_missing += [p for p in needed if not (data_dir / p).exists()]
                live = [*models, *(c.path for c in checkpoints)]
                stale_files += _stale_in("disk", data_dir, job, live, job.finished_at)
                if store_dir is not None:
                    stale_files += _stale_in("store", store_dir, job, live, job.finished_at)
        stuck = sum(1 for j in jobs.values() if _stuck(j, now))
    return Audit(
        statuses=statuses,
        attempts=attempts,
        lost=sum(1 for st in statuses.values() if st not in TERMINAL),
        concurrent=sum(_overlaps(a, now) for a in attempts.values()),
        duplicates=duplicates,
        steps_redone=max(redone) if redone else None,
        drops=drops,
        stuck=stuck,
        stale_rows=stale_rows,
        stale_files=stale_files,
        live_missing=live_missing,
    )


def event_time(database_url: str, job_id: str, contains: str, after: datetime) -> datetime | None:
    """When the first event of `job_id` whose message contains `contains` was written after
    `after`."""
    with session_scope(database_url, readonly=True) as s:
        found = s.scalar(
            select(func.min(JobEvent.created_at)).where(
                JobEvent.job_id == job_id,
                JobEvent.created_at > after,
                JobEvent.message.contains(contains),
            )
        )
    return found


def claimed_at(database_url: str, job_id: str, after: datetime) -> datetime | None:
    return event_time(database_url, job_id, "claimed by", after)


def pool_child(pid: int) -> int | None:
    """The pid of a prefork worker's pool process, once it has one (Linux /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _virtual_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmSize for process {pid}")


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it now (a worker's training processes: torchrun and
    its ranks), from /proc's children lists."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found.extend(process_tree(int(child)))
    return found


def limit_file_size(pid: int, max_bytes: int | None) -> None:
    """Make writes of process `pid` and the processes below it past `max_bytes` per file
    fail (EFBIG), as on a full disk; None lifts the limit. Python processes ignore SIGXFSZ,
    so the write raises. Processes it starts later inherit the limit."""
    for each in process_tree(pid):
        try:
            _soft, hard = resource.prlimit(each, resource.RLIMIT_FSIZE)
            limit = hard if max_bytes is None else max_bytes
            resource.prlimit(each, resource.RLIMIT_FSIZE, (limit, hard))
        except ProcessLookupError:
            continue


def limit_memory(pid: int, extra_bytes: int | None) -> None:
    """Cap the address space of process `pid` at its current size plus `extra_bytes` (an
    allocation limit: a bigger allocation fails); None lifts the cap."""
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_AS)
    if extra_bytes is None:
        resource.prlimit(pid, resource.RLIMIT_AS, (hard, hard))
        return
    size = _virtual_size(pid)
    resource.prlimit(pid, resource.RLIMIT_AS, (size + extra_bytes, hard))


def kill9(pid: int) -> datetime:
    at = datetime.now(UTC)
    os.kill(pid, signal.SIGKILL)
    return at
