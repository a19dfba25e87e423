"""Issue 15, faults 1 and 2: a worker paused (SIGSTOP) past its lease while another takes
its jobs over, then resumed: a fine-tune, and a decode group of three generation jobs. The
stale attempt's writes fail or vanish, on disk and in the artifact store as well as in rows."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.scenarios import Lab
from tests.faults.test_broker_faults import assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def test_worker_paused_past_its_lease_mid_finetune_leaves_no_stale_write(lab: Lab) -> None:
    outcome = scenarios.sigstop_past_lease_mid_finetune(lab)
    job, found = outcome.details["job"], outcome.audit
    assert outcome.details["taken_over"], (job, found.attempts)
    assert job["status"] == "succeeded", job
    claims = found.claims(job["id"])
    assert claims[0] == outcome.details["victim"] and claims[-1] != claims[0], claims
    assert outcome.details["stale_worker_ran"], "the paused worker never ran again"
    assert outcome.details["victim_alive"]
    # one row per step and per checkpoint, every step of the run, the last checkpoint at the end
    steps = outcome.details["metric_steps"]
    assert steps == sorted(set(steps)) and steps[-1] == job["result"]["train"]["global_step"]
    assert outcome.details["checkpoints"][-1] == steps[-1]
    assert job["result"]["resumed_from_step"] is not None
    assert_clean(outcome)


def test_worker_paused_past_its_lease_mid_decode_group_leaves_no_stale_write(lab: Lab) -> None:
    outcome = scenarios.sigstop_past_lease_mid_decode(lab)
    assert outcome.details["grouped"], "the three jobs did not decode on one worker"
    assert outcome.details["taken_over"], (
        {j: (d["status"], d["attempts"], d["error"]) for j, d in outcome.details["jobs"].items()},
        outcome.audit.attempts,
        outcome.details["logs"],
    )
    assert outcome.details["stale_worker_ran"], "the paused worker never ran again"
    for job_id, job in outcome.details["jobs"].items():
        assert job["status"] == "succeeded", job
        claims = outcome.audit.claims(job_id)
        assert claims[0] == outcome.details["victim"] and claims[-1] != claims[0], claims
        outputs = outcome.details["outputs"][job_id]
        assert [(o["prompt_index"], o["sequence_index"]) for o in outputs] == [(0, 0)]
    assert outcome.details["blocker"]["status"] == "cancelled"
    assert_clean(outcome)
