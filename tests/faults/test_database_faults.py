"""Scenarios 7, 12 and 25: PostgreSQL stopped while a fine-tune trains (a private cluster,
not the shared server), concurrent submissions with one Idempotency-Key, and a connection
lost during a fine-tune's finishing COMMIT."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.scenarios import Lab
from tests.faults.test_broker_faults import assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def test_postgres_down_mid_finetune_training_goes_on_and_api_answers_503(lab: Lab) -> None:
    outcome = scenarios.postgres_down_during_finetune(lab, down_s=8)
    job = outcome.details["job"]
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1  # never marked failed, never restarted
    assert job["result"]["resumed_from_step"] is None
    assert job["result"]["train"]["global_step"] == outcome.details["steps"]
    answers = outcome.details["answers"]
    assert answers, "nothing was asked while the database was down"
    assert {(code, kind) for _, code, kind in answers} == {(503, "service_unavailable")}
    assert {what.split()[0] for what, _, _ in answers} == {"GET", "POST"}
    # metrics written while it was down were buffered, then written once: every step, once
    steps = outcome.details["metric_steps"]
    assert steps == sorted(set(steps))
    assert steps[-1] == outcome.details["steps"]
    assert outcome.details["buffered_events"], "no buffered records were written afterwards"
    assert outcome.details["checkpoints"][-1] == outcome.details["steps"]
    # a reconciler pass as the database came back left the job to its live worker
    at_return = outcome.details["reconcile_at_return"]
    assert (at_return.requeued, at_return.failed) == (0, 0), at_return
    assert_clean(outcome)


def test_concurrent_posts_with_one_idempotency_key_create_one_job(lab: Lab) -> None:
    outcome = scenarios.concurrent_idempotent_posts(lab, clients=10)
    answers = outcome.details["answers"]
    assert len(answers) == 10
    assert len(outcome.details["ids"]) == 1
    assert sorted(code for code, _, _ in answers) == [200] * 9 + [202]
    assert all(replayed == "true" for code, _, replayed in answers if code == 200)
    (job_id,) = outcome.details["ids"]
    assert outcome.audit.statuses[job_id] == "succeeded"
    assert len(outcome.audit.claims(job_id)) == 1
    assert outcome.audit.duplicates["jobs per idempotency key"] == 0
    assert_clean(outcome)


def test_a_commit_that_landed_though_it_raised_keeps_the_registered_model(lab: Lab) -> None:
    outcome = scenarios.commit_lost_at_finish(lab)
    job = outcome.details["job"]
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1  # settled by reading the job, not run again
    assert outcome.details["model"] is not None
    assert "model.safetensors" in outcome.details["files"], outcome.details["files"]
    assert outcome.details["injected"] and outcome.details["settled"]
    assert_clean(outcome)
