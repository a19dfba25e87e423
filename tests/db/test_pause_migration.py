"""Migration 0008 adds jobs.pause_requested: jobs already stored read as not paused, and
the downgrade takes the column away again."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command

from db.jobs import get_job
from db.pauses import request_pause
from db.session import alembic_config, migrate, session_scope
from tests.db.test_tenants_migration import _filler


def _job_columns(database_url: str) -> set[str]:
    engine = sa.create_engine(database_url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
    finally:
        engine.dispose()


def test_upgrade_keeps_jobs_unpaused_and_downgrade_removes_the_flag(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "0007")
    engine = sa.create_engine(database_url)
    try:
        jobs = sa.Table("jobs", sa.MetaData(), autoload_with=engine)
        row = {c.name: _filler(c, "job_before_pause") for c in jobs.columns if not c.nullable}
        row.update(kind="finetune", status="queued", tenant_id="default")
        with engine.begin() as conn:
            conn.execute(jobs.insert().values(**row))
    finally:
        engine.dispose()
    migrate(database_url)
    with session_scope(database_url) as s:
        job = get_job(s, "job_before_pause")
        assert job is not None and job.pause_requested is False
        assert request_pause(s, "job_before_pause", tenant_id="default").status == "paused"
    command.downgrade(alembic_config(database_url), "0007")
    assert "pause_requested" not in _job_columns(database_url)
    migrate(database_url)
    assert "pause_requested" in _job_columns(database_url)
