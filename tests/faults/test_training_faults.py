"""Row 29 (issue 18): kill -9 of one of a fine-tune's training processes."""

from __future__ import annotations

import pytest

from tests.faults import training_scenarios
from tests.faults.scenarios import Lab
from tests.faults.test_broker_faults import assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def test_kill9_of_one_training_process_resumes_on_the_same_worker(lab: Lab) -> None:
    steps, every = 120, 20  # the table's row (bench.faults) runs 300 and 25
    outcome = training_scenarios.kill_one_training_process(lab, steps, every)
    job = outcome.details["job"]
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert job["result"]["resumed_from_step"] >= outcome.details["saved"]
    assert job["result"]["train"]["global_step"] == steps
    assert outcome.details["worker_alive"]  # the worker process itself was not touched
    assert outcome.figures.steps_redone is not None and outcome.figures.steps_redone <= every
    assert_clean(outcome)
