"""The verdict `modelyard workers --check` gives a worker from its report."""

from __future__ import annotations

from core.worker_reports import WorkerReport
from workers.readiness import judge, kinds_for

NOW = 1_000_000.0


def report(busy: bool = False, last_active: float = NOW) -> WorkerReport:
    return WorkerReport(
        hostname="worker-1@host",
        pid=1,
        queues=("generate", "maintenance", "train"),
        busy=busy,
        job="job_x" if busy else None,
        last_active=last_active,
        started=NOW - 100,
        reported=NOW,
    )


def test_idle_worker_with_jobs_waiting_longer_than_the_stall_time_is_stalled() -> None:
    health = judge(report(last_active=NOW - 30), waiting=2, stall_s=10, now=NOW)
    assert (health.verdict, health.ready) == ("stalled", False)


def test_recent_activity_or_no_waiting_job_or_a_running_job_is_ready() -> None:
    assert judge(report(last_active=NOW - 5), waiting=2, stall_s=10, now=NOW).verdict == "idle"
    assert judge(report(last_active=NOW - 30), waiting=0, stall_s=10, now=NOW).verdict == "idle"
    busy = judge(report(busy=True, last_active=NOW - 30), waiting=2, stall_s=10, now=NOW)
    assert (busy.verdict, busy.ready) == ("busy", True)


def test_a_worker_only_answers_for_the_kinds_of_its_queues() -> None:
    assert {k.value for k in kinds_for(("train",))} == {"finetune"}
    assert "finetune" not in {k.value for k in kinds_for(("generate",))}
