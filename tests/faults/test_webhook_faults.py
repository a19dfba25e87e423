"""Fault 2 of issue 16: two recovery leaders at once over 200 webhook deliveries."""

from __future__ import annotations

import pytest

from tests.faults.scenarios import Lab
from tests.faults.test_broker_faults import assert_clean
from tests.faults.webhook_scenarios import two_leaders_at_once

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def test_two_leaders_at_once_send_each_delivery_once_and_run_each_job_once(lab: Lab) -> None:
    outcome = two_leaders_at_once(lab)
    assert outcome.details["ran_to_the_end"] == [True, True], outcome.details["logs"]
    received, ids = outcome.details["received"], outcome.details["ids"]
    missing = {i: outcome.details["rows"][i] for i in set(ids) - set(received)}
    assert not missing, (missing, outcome.details["logs"])
    assert max(received.values()) == 1, received.most_common(3)
    assert set(outcome.details["rows"].values()) == {("delivered", 1)}
    assert set(outcome.audit.statuses.values()) == {"succeeded"}
    assert all(len(a) == 1 for a in outcome.audit.attempts.values())
    assert_clean(outcome)
