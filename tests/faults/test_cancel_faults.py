"""Issue 15, faults 3 and 4: a cancel racing a transient error, a SIGTERM hand-back and a
disk-full cancel checkpoint, and a cancel 10 ms after the claim of a job that would finish
in under a second. Each ends `cancelled`; none stays queued with its cancel flag set."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.scenarios import Lab
from tests.faults.test_broker_faults import assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def test_cancel_racing_a_transient_error_ends_cancelled(lab: Lab) -> None:
    outcome = scenarios.cancel_races_transient_error(lab)
    job = outcome.details["job"]
    assert job["status"] == "cancelled", (job, outcome.details["events"])
    assert len(outcome.audit.claims(job["id"])) == 1  # not run again after the error
    assert_clean(outcome)


def test_cancel_racing_a_sigterm_hand_back_ends_cancelled(lab: Lab) -> None:
    outcome = scenarios.cancel_races_sigterm(lab)
    job = outcome.details["job"]
    assert outcome.details["exit_code"] == 0
    assert job["status"] == "cancelled", (job, outcome.details["events"])
    assert len(outcome.audit.claims(job["id"])) == 1
    assert_clean(outcome)


def test_cancel_racing_a_disk_full_cancel_checkpoint_ends_cancelled(lab: Lab) -> None:
    outcome = scenarios.cancel_races_disk_full(lab)
    job = outcome.details["job"]
    assert job["status"] == "cancelled", (job, outcome.details["events"])
    assert len(outcome.audit.claims(job["id"])) == 1
    assert outcome.details["checkpoints"] == []  # the failed save left no checkpoint row
    assert_clean(outcome)  # nor files: no staging dir, no half checkpoint


def test_cancel_10ms_after_claim_of_a_short_finetune_registers_no_model(lab: Lab) -> None:
    outcome = scenarios.cancel_just_after_claim(lab, delay_s=0.01)
    job = outcome.details["job"]
    assert outcome.details["cancel_status"] == 202
    assert job["status"] == "cancelled", job
    assert "model" not in (job["result"] or {}), job["result"]
    assert outcome.details["models"] == []
    assert_clean(outcome)  # no model files on disk or in the store either
