"""Counting what a fault did to jobs, from the database: the figures of tests/faults and
bench/faults.py (lost, concurrent duplicate executions, duplicate effects, steps redone).

Attempts are read from job events: a claim (`running`, data.worker) opens one; an event
that the same worker wrote when its attempt ended (data.by: finished, retried, handed
back, stopped after losing its lease) closes it. An attempt that never closed ended when
its process died (`deaths`), or is counted as still running. Two attempts of one job by
different workers whose spans overlap are a concurrent duplicate execution.
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


@dataclass(frozen=True)
class Attempt:
    worker: str
    start: datetime
    end: datetime | None  # None: still running when audited


@dataclass
class Audit:
    statuses: dict[str, str]
    attempts: dict[str, list[Attempt]]
    lost: int
    concurrent: int
    duplicates: dict[str, int]
    steps_redone: int | None
    drops: dict[str, int] = field(default_factory=dict)  # duplicate deliveries dropped per job

    @property
    def duplicate_effects(self) -> int:
        return sum(self.duplicates.values())

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
            steps_redone=audit.steps_redone,
            recover_s=recover_s,
            note=note,
        )


def _attempts(events: list[JobEvent], deaths: Mapping[str, datetime]) -> list[Attempt]:
    open_: dict[str, datetime] = {}
    done: list[Attempt] = []
    for event in events:
        data = event.data or {}
        if event.type == "status" and data.get("status") == "running" and data.get("worker"):
            open_[str(data["worker"])] = event.created_at
            continue
        by = data.get("by")
        if by and by in open_:
            done.append(Attempt(str(by), open_.pop(str(by)), event.created_at))
    for worker, start in open_.items():
        done.append(Attempt(worker, start, deaths.get(worker)))
    return sorted(done, key=lambda a: a.start)


def _overlaps(attempts: list[Attempt], now: datetime) -> int:
    count = 0
    for i, a in enumerate(attempts):
        for b in attempts[i + 1 :]:
            if a.worker == b.worker:
                continue
            if max(a.start, b.start) < min(a.end or now, b.end or now):
                count += 1
    return count


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
) -> Audit:
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
    return Audit(
        statuses=statuses,
        attempts=attempts,
        lost=sum(1 for st in statuses.values() if st not in TERMINAL),
        concurrent=sum(_overlaps(a, now) for a in attempts.values()),
        duplicates=duplicates,
        steps_redone=max(redone) if redone else None,
        drops=drops,
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


def limit_file_size(pid: int, max_bytes: int | None) -> None:
    """Make writes of process `pid` past `max_bytes` per file fail (EFBIG), as on a full
    disk; None lifts the limit. Python processes ignore SIGXFSZ, so the write raises."""
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard if max_bytes is None else max_bytes, hard))


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
