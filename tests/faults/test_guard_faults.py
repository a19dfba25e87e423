"""Fault 6 of issue 16: quotas under concurrency, liveness beside capped tenants, and a
webhook destination that rebinds after its check."""

from __future__ import annotations

import pytest

from tests.faults import guard_scenarios
from tests.faults.scenarios import Lab
from tests.faults.test_broker_faults import assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def test_fifty_concurrent_posts_against_a_queued_quota_of_ten(lab: Lab) -> None:
    outcome = guard_scenarios.concurrent_posts_against_quota(lab, posts=50, quota=10)
    codes = outcome.details["codes"]
    assert codes.count(202) == 10, codes
    assert set(codes) == {202, 429}, codes
    assert set(outcome.audit.statuses.values()) == {"succeeded"}
    assert_clean(outcome)


def test_idle_worker_beside_a_capped_tenant_backlog_passes_liveness(lab: Lab) -> None:
    outcome = guard_scenarios.capped_tenant_liveness(lab)
    during = outcome.details["during"]
    assert during.count("running") == 1 and during.count("queued") == 2, during
    code, output = outcome.details["check"]
    assert code == 0, output
    assert_clean(outcome)


def test_a_rebinding_webhook_name_never_reaches_the_internal_address(lab: Lab) -> None:
    outcome = guard_scenarios.rebinding_webhook_destination(lab)
    reached = outcome.details["reached"]
    assert reached["internal"] == []
    assert [host for _, host in reached["checked"]] == [
        f"{guard_scenarios.REBINDING_NAME}:{outcome.details['port']}"
    ]
    assert outcome.details["delivery"] == ("delivered", 1)
    assert set(outcome.audit.statuses.values()) == {"succeeded"}
    assert_clean(outcome)
