"""Compare-and-set behaviour of the job repository on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from core.enums import JobStatus
from core.errors import InvalidStateError
from db.attempts import finish_job
from db.jobs import claim_job, get_job, renew_lease, transition
from db.session import migrate, session_scope
from tests.support.jobs import insert_job

TTL = timedelta(seconds=30)


@pytest.fixture(scope="module")
def url(database_url: str) -> str:
    migrate(database_url)
    return database_url


def test_concurrent_claims_have_exactly_one_winner(url: str) -> None:
    for _ in range(10):
        job_id = insert_job(url)
        barrier = threading.Barrier(4)
        wins: list[str] = []

        def claim(
            worker: str,
            job_id: str = job_id,
            barrier: threading.Barrier = barrier,
            wins: list[str] = wins,
        ) -> None:
            barrier.wait()
            with session_scope(url) as s:
                if claim_job(s, job_id, worker, TTL):
                    wins.append(worker)

        threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        with session_scope(url) as s:
            job = get_job(s, job_id)
            assert job is not None
            assert job.attempts == 1
            assert job.lease_owner == wins[0]


def test_only_the_lease_owner_can_finish_or_renew(url: str) -> None:
    job_id = insert_job(url)
    with session_scope(url) as s:
        assert claim_job(s, job_id, "owner", TTL)
    with session_scope(url) as s:
        assert not finish_job(s, job_id, JobStatus.SUCCEEDED, attempt=2)
        assert not renew_lease(s, job_id, 2, TTL, 0.5).held
        state = renew_lease(s, job_id, 1, TTL, 0.5)
        assert state.held
        assert not state.cancel_requested
    with session_scope(url) as s:
        assert finish_job(s, job_id, JobStatus.SUCCEEDED, attempt=1)
        job = get_job(s, job_id)
        assert job is not None
        assert job.status == "succeeded"
        assert job.lease_owner is None
        assert job.progress == 1.0
    with session_scope(url) as s:
        assert not claim_job(s, job_id, "late", TTL)


def test_transition_refuses_what_the_state_machine_refuses(url: str) -> None:
    job_id = insert_job(url)
    with session_scope(url) as s, pytest.raises(InvalidStateError):
        transition(s, job_id, JobStatus.QUEUED, JobStatus.SUCCEEDED)


def test_transition_from_wrong_status_changes_nothing(url: str) -> None:
    job_id = insert_job(url)
    with session_scope(url) as s:
        assert not transition(s, job_id, JobStatus.RUNNING, JobStatus.SUCCEEDED)
        job = get_job(s, job_id)
        assert job is not None
        assert job.status == "queued"


def test_outputs_with_nul_characters_are_stored(url: str) -> None:
    from db.outputs import OutputRecord, add_outputs, list_outputs

    job_id = insert_job(url)
    with session_scope(url) as s:
        add_outputs(s, job_id, [OutputRecord(0, 0, "a\x00b", "length", 1, 3)])
    with session_scope(url) as s:
        assert [o.text for o in list_outputs(s, job_id)] == ["a\ufffdb"]


def test_non_finite_numbers_in_json_columns_are_stored_as_null(url: str) -> None:
    job_id = insert_job(url)
    with session_scope(url) as s:
        assert claim_job(s, job_id, "w", TTL)
        result = {"eval": {"perplexity": float("inf"), "loss": float("nan"), "ok": [1.5]}}
        assert finish_job(s, job_id, JobStatus.SUCCEEDED, attempt=1, result=result)
    with session_scope(url) as s:
        job = get_job(s, job_id)
        assert job is not None
        assert job.result == {"eval": {"perplexity": None, "loss": None, "ok": [1.5]}}
