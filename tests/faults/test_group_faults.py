"""Issue 15, fault 5: one job of a decode group of three fails (a database error while
recording it; a bad LoRA adapter): that job ends alone, the other two succeed."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.scenarios import Lab
from tests.faults.test_broker_faults import assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def _one_failed_alone(outcome: scenarios.Outcome) -> None:
    assert outcome.details["grouped"], "the three jobs did not decode on one worker"
    first, broken, third = outcome.details["jobs"]
    for job, outputs in (
        (first, outcome.details["outputs"][0]),
        (third, outcome.details["outputs"][2]),
    ):
        assert job["status"] == "succeeded", (job["error"], broken["status"], broken["error"])
        assert [(o["prompt_index"], o["sequence_index"]) for o in outputs] == [(0, 0)]
    assert broken["status"] == "failed", broken
    assert outcome.details["outputs"][1] == []


def test_database_error_recording_one_job_of_a_decode_group_fails_it_alone(lab: Lab) -> None:
    outcome = scenarios.db_error_in_decode_group(lab)
    _one_failed_alone(outcome)
    assert_clean(outcome)


def test_bad_adapter_in_one_job_of_a_decode_group_fails_it_alone(lab: Lab) -> None:
    outcome = scenarios.bad_adapter_in_decode_group(lab)
    _one_failed_alone(outcome)
    assert_clean(outcome)
