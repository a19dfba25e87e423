"""The database's clock (db/clock.py) on SQLite and PostgreSQL: values compare with
UTCDateTime columns, offsets move them, and they do not follow the host's clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from db.clock import database_now, db_now, db_time_after
from db.jobs import claim_job, get_job
from db.models import Job
from db.session import migrate, session_scope
from tests.support.jobs import insert_job


@pytest.fixture(scope="module")
def url(database_url: str) -> str:
    migrate(database_url)
    return database_url


def test_database_now_is_utc_and_close_to_real_time(url: str) -> None:
    with session_scope(url) as s:
        now = database_now(s)
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)


def test_offsets_move_the_time_both_ways(url: str) -> None:
    with session_scope(url) as s:
        now, later, earlier = s.execute(
            select(db_now(), db_time_after(90.5), db_time_after(-30.0))
        ).one()
    assert timedelta(seconds=90) < later - now < timedelta(seconds=91)
    assert timedelta(seconds=29) < now - earlier < timedelta(seconds=31)


def test_written_values_compare_with_the_clock_in_sql(url: str) -> None:
    job_id = insert_job(url)
    with session_scope(url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=db_time_after(60)))
    with session_scope(url) as s:
        stored = get_job(s, job_id)
        assert stored is not None and stored.lease_expires_at is not None
        assert abs(stored.lease_expires_at - (database_now(s) + timedelta(seconds=60))) < (
            timedelta(seconds=5)
        )
        found = s.scalars(
            select(Job.id).where(Job.id == job_id, Job.lease_expires_at > db_now())
        ).all()
        assert found == [job_id]
        past = s.scalars(
            select(Job.id).where(Job.id == job_id, Job.lease_expires_at < db_time_after(120))
        ).all()
        assert past == [job_id]


def test_a_time_taken_here_just_before_is_never_after_the_database_now(url: str) -> None:
    # SQLite's 'now' has millisecond precision while this host writes microseconds; a
    # clock rounded down put "now" before a time written in the same millisecond.
    with session_scope(url) as s:
        for _ in range(50):
            before = datetime.now(UTC)
            assert database_now(s) >= before


def test_a_job_is_claimable_in_the_millisecond_it_was_queued(url: str) -> None:
    # Its available_at is written by this host; the claim compares it with the
    # database's clock, so a claim right after the insert must not find it "not yet due".
    for _ in range(20):
        job_id = insert_job(url)
        with session_scope(url) as s:
            assert claim_job(s, job_id, "w", timedelta(seconds=30))
