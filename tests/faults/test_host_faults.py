"""Issue 18, row 26 of the fault table: a worker host cut off from the network mid
fine-tune (tests/faults/host_scenarios.py). Its lease watchdog stops the attempt before the
lease can run out, the other host resumes the job from the last checkpoint it published to
the shared S3 store, and once the link is back the cut-off host's late writes are refused
and it takes new work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import host_scenarios
from tests.faults.host_scenarios import HostsLab
from tests.faults.test_broker_faults import assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow, pytest.mark.hosts]


@pytest.fixture(scope="module")
def hosts_lab(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostsLab]:
    with host_scenarios.hosts_lab(tmp_path_factory.mktemp("host-faults"), tiny_model_dir) as lab:
        yield lab


def test_a_host_cut_off_mid_finetune_stops_before_its_lease_ends_and_the_job_resumes_elsewhere(
    hosts_lab: HostsLab,
) -> None:
    outcome = host_scenarios.cut_off_mid_finetune(hosts_lab)
    d = outcome.details
    job = d["job"]
    assert (job["status"], job["attempts"]) == ("succeeded", 2), job
    assert d["claim_hosts"] == [d["victim_host"], d["survivor_host"]], d["claim_hosts"]
    # resumed from the cut-off host's last recorded checkpoint, redoing at most the steps
    # that host had trained past it
    saved = d["checkpoints_of_attempt_1"]
    assert saved, "no checkpoint of attempt 1 recorded"
    resumed_from = job["result"]["resumed_from_step"]
    assert resumed_from == saved[-1], (resumed_from, saved)
    assert d["last_step"] >= resumed_from, d
    assert 0 <= job["result"]["steps_redone"] <= d["last_step"] - resumed_from, (job, d)
    # the cut-off host's watchdog told it to stop before its lease could end, and it trained
    # its last step before the other host claimed the job (one clock: every namespace shares
    # this machine's)
    assert d["taken_at"] is not None and d["lease_end"] is not None, d
    assert d["stop_asked_at"] is not None, "the cut-off worker's watchdog never stopped it"
    assert d["cut_at"] < d["stop_asked_at"] < d["lease_end"] < d["taken_at"], d
    assert d["last_step_at"] < d["taken_at"], d
    # nothing of attempt 1 after the takeover, and the cut-off host takes new work
    assert d["late_events"] == [], d["late_events"]
    assert d["events_unchanged"]
    assert d["later"]["status"] == "succeeded", d["later"]
    assert d["later_hosts"] == [d["victim_host"]], d["later_hosts"]
    assert_clean(outcome)
