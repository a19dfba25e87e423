from __future__ import annotations

import pytest

from core.enums import JobStatus
from core.states import TERMINAL, TRANSITIONS, can_transition, sources_of


def test_terminal_statuses_have_no_way_out() -> None:
    assert {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
        JobStatus.EXPIRED,
    } == TERMINAL
    for status in TERMINAL:
        assert all(not can_transition(status, t) for t in JobStatus)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (JobStatus.QUEUED, JobStatus.RUNNING),
        (JobStatus.QUEUED, JobStatus.CANCELLED),
        (JobStatus.RUNNING, JobStatus.SUCCEEDED),
        (JobStatus.RUNNING, JobStatus.FAILED),
        (JobStatus.RUNNING, JobStatus.CANCELLED),
        (JobStatus.RUNNING, JobStatus.QUEUED),
        (JobStatus.QUEUED, JobStatus.EXPIRED),
        (JobStatus.RUNNING, JobStatus.EXPIRED),
        (JobStatus.QUEUED, JobStatus.PAUSED),
        (JobStatus.RUNNING, JobStatus.PAUSED),
        (JobStatus.PAUSED, JobStatus.QUEUED),
        (JobStatus.PAUSED, JobStatus.CANCELLED),
    ],
)
def test_allowed(source: JobStatus, target: JobStatus) -> None:
    assert can_transition(source, target)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (JobStatus.QUEUED, JobStatus.SUCCEEDED),
        (JobStatus.QUEUED, JobStatus.FAILED),
        (JobStatus.SUCCEEDED, JobStatus.QUEUED),
        (JobStatus.CANCELLED, JobStatus.RUNNING),
        (JobStatus.EXPIRED, JobStatus.QUEUED),
        (JobStatus.EXPIRED, JobStatus.RUNNING),
        (JobStatus.PAUSED, JobStatus.RUNNING),  # resumed jobs are queued and claimed again
        (JobStatus.PAUSED, JobStatus.SUCCEEDED),
        (JobStatus.SUCCEEDED, JobStatus.PAUSED),
    ],
)
def test_refused(source: JobStatus, target: JobStatus) -> None:
    assert not can_transition(source, target)


def test_every_status_is_in_the_machine() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    assert sources_of(JobStatus.QUEUED) == {JobStatus.RUNNING, JobStatus.PAUSED}
    assert sources_of(JobStatus.PAUSED) == {JobStatus.QUEUED, JobStatus.RUNNING}
    assert sources_of(JobStatus.EXPIRED) == {JobStatus.QUEUED, JobStatus.RUNNING}
