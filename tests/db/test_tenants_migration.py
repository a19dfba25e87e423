"""Migration 0006 upgrades a database that already holds jobs and datasets: they move to
the `default` tenant, whose admin keys then see them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from alembic import command

from db.datasets import get_dataset
from db.jobs import get_job
from db.session import alembic_config, migrate, session_scope


def _filler(column: sa.Column[Any], ident: str) -> Any:
    if column.name == "id":
        return ident
    kind = column.type
    if isinstance(kind, sa.DateTime):
        return datetime(2026, 1, 1)
    if isinstance(kind, sa.Boolean):
        return False
    if isinstance(kind, sa.Integer | sa.Float):
        return 0
    if isinstance(kind, sa.JSON):
        return {}
    return "x"


def _insert_row(engine: sa.Engine, table: str, ident: str) -> None:
    t = sa.Table(table, sa.MetaData(), autoload_with=engine)
    row = {c.name: _filler(c, ident) for c in t.columns if not c.nullable}
    with engine.begin() as conn:
        conn.execute(t.insert().values(**row))


def test_upgrade_moves_existing_rows_to_the_default_tenant(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "0005")
    engine = sa.create_engine(database_url)
    try:
        _insert_row(engine, "jobs", "job_before_tenants")
        _insert_row(engine, "datasets", "ds_before_tenants")
    finally:
        engine.dispose()
    migrate(database_url)
    with session_scope(database_url) as s:
        job = get_job(s, "job_before_tenants", "default")
        dataset = get_dataset(s, "ds_before_tenants", "default")
        assert job is not None and job.tenant_id == "default"
        assert dataset is not None and dataset.tenant_id == "default"
        assert get_job(s, "job_before_tenants", "someone-else") is None
    command.downgrade(alembic_config(database_url), "0005")
    migrate(database_url)
