"""Scenarios 2, 9 and 11: a pool child killed, SIGTERM mid fine-tune, cancels followed by
a restart of every worker. (Scenario 1, kill -9 of a worker mid fine-tune, runs in
tests/e2e/test_finetune.py on SQLite and PostgreSQL.)"""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.scenarios import Lab
from tests.faults.test_broker_faults import assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def test_killed_pool_child_job_runs_again_and_the_worker_lives(lab: Lab) -> None:
    outcome = scenarios.kill_pool_child(lab)
    job = outcome.details["job"]
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert outcome.details["main_alive"]
    assert outcome.details["new_child"] not in (None, outcome.details["child"])
    claims = outcome.audit.claims(job["id"])
    assert claims[0] == outcome.details["killed_identity"]
    assert len(claims) == 2
    assert_clean(outcome)


def test_sigterm_mid_finetune_checkpoints_and_hands_the_job_back(lab: Lab) -> None:
    outcome = scenarios.sigterm_mid_finetune(lab)
    job = outcome.details["job"]
    assert outcome.details["exit_code"] == 0
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert (job["max_attempts"], job["handbacks"]) == (3, 1)  # the hand-back does not count
    claims = outcome.audit.claims(job["id"])
    assert claims[0] == outcome.details["victim"] and claims[1] != claims[0]
    assert job["result"]["resumed_from_step"] is not None
    assert outcome.figures.steps_redone == 0  # it resumed from the step it stopped at
    assert_clean(outcome)


def test_cancelled_jobs_never_run_again_after_all_workers_restart(lab: Lab) -> None:
    outcome = scenarios.cancel_then_restart_workers(lab, at_step=5)
    training, queued = outcome.details["training"], outcome.details["queued"]
    assert training["status"] == "cancelled"
    assert len(outcome.audit.claims(training["id"])) == 1
    assert len(outcome.details["checkpoints"]) == 1
    assert outcome.details["checkpoints"][0] >= outcome.details["at_step"]
    assert queued["status"] == "cancelled"
    assert (queued["attempts"], queued["started_at"]) == (0, None)
    assert outcome.audit.claims(queued["id"]) == []
    assert outcome.audit.drops[queued["id"]] == 1
    assert_clean(outcome)
