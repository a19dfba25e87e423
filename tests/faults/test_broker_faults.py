"""Scenarios 3-6: the broker's visibility timeout, prefetch, Redis restarted empty, Redis
unreachable, and the readiness check that finds workers that stopped consuming."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.scenarios import Lab

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def assert_clean(outcome: scenarios.Outcome) -> None:
    """Nothing lost or stuck, no attempt overlapping another, nothing written twice, no
    stale write surviving (rows after the final commit, files no live row names, live
    files changed after it or gone)."""
    figures, found = outcome.figures, outcome.audit
    assert (figures.lost, figures.stuck, figures.concurrent) == (0, 0, 0), (
        figures,
        found.statuses,
        found.attempts,
    )
    assert figures.duplicate_effects == 0, found.duplicates
    assert figures.stale_writes == 0, (found.stale_rows, found.stale_files, found.live_missing)


def test_worker_refuses_a_visibility_timeout_shorter_than_the_job_time_limit(lab: Lab) -> None:
    out = scenarios.refused_worker_start(lab.stack)
    assert out.returncode == 2, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert "refusing to start" in text
    assert "MODELYARD_BROKER_VISIBILITY_TIMEOUT_S=30" in text
    assert "MODELYARD_JOB_TIME_LIMIT_S=60" in text


def test_job_longer_than_the_visibility_timeout_runs_once(lab: Lab) -> None:
    outcome = scenarios.visibility_timeout(lab)
    job = outcome.details["job"]
    assert job["status"] == "succeeded"
    assert job["attempts"] == 1
    assert outcome.audit.claims(job["id"]) == [outcome.details["runner"]]
    # Redis did deliver the message again while the job ran, and the claim dropped it
    assert outcome.audit.drops[job["id"]] >= 1
    assert outcome.details["dropped_at"] < outcome.audit.attempts[job["id"]][0].end
    assert_clean(outcome)


def test_no_job_waits_behind_a_busy_worker_while_another_is_idle(lab: Lab) -> None:
    outcome = scenarios.no_job_behind_busy_worker(lab)
    long_job, *short = outcome.details["jobs"]
    assert all(d["status"] == "succeeded" for d in outcome.details["done"])
    long_worker = outcome.audit.claims(long_job)
    short_workers = {w for j in short for w in outcome.audit.claims(j)}
    assert len(long_worker) == 1
    assert long_worker[0] not in short_workers  # nothing was prefetched behind the long job
    assert len(short_workers) == 1
    for job_id in short:
        assert outcome.details["ends"][job_id] < outcome.details["ends"][long_job]
    assert_clean(outcome)


def test_redis_restarted_empty_loses_no_queued_job(lab: Lab) -> None:
    outcome = scenarios.redis_restart_without_persistence(lab, queued=50)
    assert set(outcome.audit.statuses.values()) == {"succeeded"}
    assert outcome.figures.submitted == 52
    assert all(len(outcome.audit.claims(j)) == 1 for j in outcome.audit.statuses)
    assert outcome.details["claimed_before"] == 0  # both workers were busy when Redis went
    assert outcome.details["republished"] == 50  # every lost message was sent again
    assert_clean(outcome)


def test_workers_consume_again_after_redis_was_unreachable(lab: Lab) -> None:
    outcome = scenarios.redis_unreachable(lab, down_s=5)
    assert outcome.details["during"], "jobs were accepted while Redis was down"
    assert set(outcome.audit.statuses.values()) == {"succeeded"}
    assert outcome.details["before"][0] == 0, outcome.details["before"][1]
    code, out = outcome.details["after"]
    assert code == 0, out
    verdicts = [line.split()[1] for line in out.strip().splitlines()]
    assert sorted(verdicts) in (["idle", "idle"], ["busy", "idle"], ["busy", "busy"]), out
    assert_clean(outcome)


def test_readiness_check_finds_workers_that_stopped_consuming(lab: Lab) -> None:
    found = scenarios.stalled_workers_detected(lab)
    code, out = found["stalled"]
    assert code == 1
    for hostname in found["hostnames"]:
        assert f"{hostname}  stalled" in out, out
    assert found["status_while_stalled"] == "queued"
    assert found["job"]["status"] == "succeeded"
    assert found["after_restart"][0] == 0, found["after_restart"][1]
