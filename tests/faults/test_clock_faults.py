"""Fault 5 of issue 16: worker clocks 5 minutes ahead and behind."""

from __future__ import annotations

import pytest

from tests.faults.clock_scenarios import skewed_workers
from tests.faults.scenarios import Lab

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def test_skewed_worker_clocks_neither_lose_live_jobs_nor_keep_dead_ones(lab: Lab) -> None:
    outcome = skewed_workers(lab)
    live, dead = outcome.details["jobs"]
    statuses = {job_id: job["status"] for job_id, job in outcome.details["done"].items()}
    assert statuses == {live: "succeeded", dead: "succeeded"}, (statuses, lab.stack.logs())
    # the job of the worker 5 min behind kept its one attempt: its lease never looked
    # expired to the reconciler
    assert len(outcome.audit.attempts[live]) == 1, outcome.audit.attempts[live]
    # the job of the dead worker 5 min ahead was taken back well inside those 5 minutes
    # (settle waits 90 s at most)
    assert len(outcome.audit.attempts[dead]) == 2, outcome.audit.attempts[dead]
    assert outcome.audit.lost == 0 and outcome.audit.stuck == 0
