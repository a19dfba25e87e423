"""Fault 1 of issue 16: the recovery leader dies with repairs pending."""

from __future__ import annotations

import pytest

from tests.faults.leader_scenarios import kill_recovery_leader
from tests.faults.scenarios import Lab
from tests.support.harness import TERMINAL

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def test_killing_the_recovery_leader_leaves_recovery_to_the_others(lab: Lab) -> None:
    outcome = kill_recovery_leader(lab)
    statuses = {job_id: job["status"] for job_id, job in outcome.details["done"].items()}
    assert set(statuses.values()) == {"succeeded"}, (statuses, lab.stack.logs())
    old_holder, old_term, _ = outcome.details["old_leader"]
    new_holder, new_term = outcome.details["new_leader"]
    assert new_holder != old_holder and new_term > old_term
    assert int(new_holder.split(":")[1]) in outcome.details["survivors"]
    assert outcome.audit.lost == 0 and outcome.audit.stuck == 0
    assert outcome.audit.concurrent == 0
    running, _unpublished = outcome.details["jobs"]
    assert len(outcome.audit.attempts[running]) == 2  # the lost attempt and the repair
    assert all(j["status"] in TERMINAL for j in outcome.details["done"].values())
