"""Fault 4 of issue 16: PostgreSQL stopped, then black-holed, for longer than the workers'
db_retry_s, mid fine-tune and mid decode group of three."""

from __future__ import annotations

import pytest

from tests.faults.outage_scenarios import postgres_outage
from tests.faults.scenarios import Lab
from tests.faults.test_broker_faults import assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("how", ["stopped", "blackholed"])
def test_postgres_unreachable_past_db_retry_fails_no_job_for_good(lab: Lab, how: str) -> None:
    outcome = postgres_outage(lab, how)
    done = outcome.details["done"]
    assert {j["status"] for j in done.values()} == {"succeeded"}, (done, outcome.details["logs"])
    assert outcome.details["decoding_at_outage"] == {"running"}
    assert outcome.audit.lost == 0 and outcome.audit.stuck == 0
    assert outcome.audit.concurrent == 0
    # the fine-tune's metrics: every step once, to the last, whichever attempt wrote them
    steps = outcome.details["metric_steps"]
    assert steps == sorted(set(steps)) and steps[-1] == outcome.details["steps"]
    # each generation job has one set of outputs: one per prompt, none written twice
    for job_id, outputs in outcome.details["outputs"].items():
        assert len(outputs) == 1, (job_id, outputs)
    assert_clean(outcome)
