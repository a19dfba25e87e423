"""Fault 3 of issue 16: a queued job whose message is not where a worker takes it (never
published, taken by a consumer that died before its claim, lost by a Redis restarted from
an append-only file fsynced every second) runs: the reconciler reads the broker itself."""

from __future__ import annotations

import pytest

from tests.faults import message_scenarios
from tests.faults.scenarios import Lab, Outcome

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def assert_ran_once(outcome: Outcome) -> None:
    figures, found = outcome.figures, outcome.audit
    assert set(found.statuses.values()) == {"succeeded"}, (found.statuses, outcome.details)
    assert (figures.lost, figures.stuck, figures.concurrent) == (0, 0, 0), figures
    assert figures.duplicate_effects == 0, found.duplicates
    assert all(len(found.claims(job_id)) == 1 for job_id in found.statuses), found.attempts
    assert all(outcome.details["republished"].values()), outcome.details["republished"]


def test_a_job_committed_and_never_published_runs(lab: Lab) -> None:
    outcome = message_scenarios.crash_between_commit_and_publish(lab)
    assert set(outcome.details["before"].values()) == {"absent"}
    assert_ran_once(outcome)


def test_a_message_taken_by_a_consumer_killed_before_its_claim_runs(lab: Lab) -> None:
    outcome = message_scenarios.consumer_killed_before_claim(lab)
    assert set(outcome.details["before"].values()) == {"unacked"}  # not left for an hour
    assert_ran_once(outcome)
    (job_id,) = outcome.audit.statuses
    assert outcome.details["victim"] not in outcome.audit.claims(job_id)


def test_a_push_lost_by_redis_with_aof_everysec_runs(lab: Lab) -> None:
    outcome = message_scenarios.aof_everysec_loses_the_push(lab)
    assert set(outcome.details["published"].values()) == {"queued"}
    assert outcome.details["kept"] == b"before"  # Redis restarted from its file
    assert set(outcome.details["after_restart"].values()) == {"absent"}
    assert_ran_once(outcome)
