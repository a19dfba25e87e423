"""Scenarios 8, 10, 13, 19 and the per-job deadlines: out of memory, disk full while
checkpointing, a poison job, expires_at, max_runtime_s, and a runner that ignores its stop
flag past max_runtime_s."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.scenarios import Lab
from tests.faults.test_broker_faults import assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def test_out_of_memory_fails_typed_and_the_worker_runs_the_next_job(lab: Lab) -> None:
    outcome = scenarios.out_of_memory(lab)
    oom, after = outcome.details["oom"], outcome.details["next"]
    assert oom["status"] == "failed"
    assert oom["error"]["type"] == "out_of_memory", oom["error"]
    assert oom["attempts"] == 1
    assert after["status"] == "succeeded", after
    assert outcome.details["alive"]
    assert outcome.audit.claims(after["id"]) == [outcome.details["worker"]]
    assert_clean(outcome)


def test_disk_full_while_checkpointing_keeps_the_last_good_checkpoint(lab: Lab) -> None:
    outcome = scenarios.disk_full_on_checkpoint(lab, every=20)
    failed, job, every = outcome.details["failed"], outcome.details["job"], outcome.details["every"]
    assert failed["status"] == "queued"
    assert failed["error"]["type"] == "disk_full", failed["error"]
    # nothing half-written: whole checkpoints only, and no staging directory left over
    on_disk = outcome.details["on_disk_after_failure"]
    assert on_disk and all(name.startswith("checkpoint-") for name in on_disk), on_disk
    for files in on_disk.values():
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(files)
    last = max(int(name.split("-")[1]) for name in on_disk)
    assert f"the last good checkpoint is step {last}" in failed["error"]["message"]
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert job["result"]["resumed_from_step"] == last
    assert outcome.figures.steps_redone is not None
    assert outcome.figures.steps_redone <= every
    assert_clean(outcome)


def test_poison_job_stops_after_max_attempts(lab: Lab) -> None:
    outcome = scenarios.poison_job(lab, max_attempts=2)
    job = outcome.details["job"]
    assert job["status"] == "failed"
    assert job["error"]["type"] == "worker_lost"
    assert "after 2 attempts" in job["error"]["message"]
    assert job["attempts"] == 2
    assert len(outcome.details["claims"]) == 2  # and never again, though workers restarted
    assert outcome.audit.statuses[outcome.details["sentinel"]] == "succeeded"
    assert_clean(outcome)


def test_queued_job_past_expires_at_expires_without_starting(lab: Lab) -> None:
    outcome = scenarios.queued_job_expires(lab)
    expired = outcome.details["expired"]
    assert expired["status"] == "expired"
    assert expired["error"]["type"] == "expired"
    assert (expired["attempts"], expired["started_at"]) == (0, None)
    assert outcome.audit.claims(expired["id"]) == []
    assert outcome.details["control"]["status"] == "succeeded"
    assert_clean(outcome)


def test_job_past_max_runtime_checkpoints_and_times_out(lab: Lab) -> None:
    # long enough for the fine-tune to load and start training on a loaded machine (CI
    # once took over 8 s), so that it has a checkpoint to save as it stops
    outcome = scenarios.max_runtime_times_out(lab, max_runtime_s=15)
    training, noop = outcome.details["training"], outcome.details["noop"]
    for job in (training, noop):
        assert job["status"] == "failed"
        assert job["error"]["type"] == "timed_out", job["error"]
        assert job["attempts"] == 1
    assert noop["max_runtime_s"] == 1.0
    assert "training started" in outcome.details["events"]
    assert len(outcome.details["checkpoints"]) == 1  # saved as it stopped
    assert_clean(outcome)


def test_runner_ignoring_its_stop_flag_is_stopped_by_force_and_the_worker_goes_on(
    lab: Lab,
) -> None:
    outcome = scenarios.runner_ignores_stop(lab, max_runtime_s=1.0)
    hung, following = outcome.details["hung"], outcome.details["next"]
    assert hung["status"] == "failed", hung
    assert hung["error"]["type"] == "timed_out", hung["error"]
    assert hung["attempts"] == 1
    # stopped by force: it ended long before the runner would have returned by itself
    assert outcome.details["ran_s"] < outcome.details["runner_s"], outcome.details["ran_s"]
    assert following["status"] == "succeeded", following
    assert outcome.details["next_claims"] == [outcome.details["worker"]]
    assert outcome.details["worker_alive"]
    assert_clean(outcome)
