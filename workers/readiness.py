"""Is every worker consuming? A worker can stay alive and idle while it no longer takes
messages (Celery #8030, #10302: after a broker reconnect). From the outside that looks
like this: jobs wait on the worker's queues while the worker sits idle and receives
nothing. `modelyard workers --check` reports such a worker as `stalled` and exits 1,
so an orchestrator's liveness probe can restart it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import redis

from core.enums import QUEUE_FOR_KIND, JobKind
from core.settings import Settings
from core.worker_reports import WorkerReport, read_reports
from db.base import utcnow
from db.jobs import count_waiting
from db.session import session_scope


@dataclass(frozen=True)
class WorkerHealth:
    hostname: str
    queues: tuple[str, ...]
    busy: bool
    job: str | None
    idle_s: float  # since it last received a message or ran a job
    waiting: int  # due jobs on its queues that have waited longer than worker_stall_s
    verdict: str  # "busy" | "idle" | "stalled"

    @property
    def ready(self) -> bool:
        return self.verdict != "stalled"


def kinds_for(queues: tuple[str, ...]) -> list[JobKind]:
    return [kind for kind, queue in QUEUE_FOR_KIND.items() if queue in queues]


def judge(report: WorkerReport, waiting: int, stall_s: float, now: float) -> WorkerHealth:
    idle_s = max(now - report.last_active, 0.0)
    if report.busy:
        verdict = "busy"
    elif waiting and idle_s >= stall_s:
        verdict = "stalled"
    else:
        verdict = "idle"
    return WorkerHealth(
        hostname=report.hostname,
        queues=report.queues,
        busy=report.busy,
        job=report.job,
        idle_s=round(idle_s, 1),
        waiting=waiting,
        verdict=verdict,
    )


def check_workers(settings: Settings) -> list[WorkerHealth]:
    """Every reporting worker with its verdict; raises when Redis or the database is down."""
    client: redis.Redis = redis.Redis.from_url(
        settings.broker_url, socket_timeout=5, socket_connect_timeout=5
    )
    try:
        reports = read_reports(client)
    finally:
        client.close()
    now = time.time()
    stall = timedelta(seconds=settings.worker_stall_s)
    waiting_by_queues: dict[tuple[str, ...], int] = {}
    with session_scope(settings.database_url, readonly=True) as session:
        for report in reports:
            if report.queues not in waiting_by_queues:
                waiting_by_queues[report.queues] = count_waiting(
                    session,
                    kinds_for(report.queues),
                    utcnow() - stall,
                    default_running_cap=settings.max_running_jobs,
                )
    return [judge(r, waiting_by_queues[r.queues], settings.worker_stall_s, now) for r in reports]
