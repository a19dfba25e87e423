"""SQLite transactions begin on the driver's connection (db.session): a write transaction
takes the write lock at BEGIN, and a file another program holds locked fails as SQLAlchemy's
OperationalError, which callers wait out as an unavailable database."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from db.session import DATABASE_UNAVAILABLE, make_engine


def test_a_write_transaction_holds_the_write_lock_from_its_begin(tmp_path: Path) -> None:
    path = tmp_path / "begin.db"
    engine = make_engine(f"sqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))  # a read only: the lock comes from BEGIN IMMEDIATE
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # free again once it committed
        other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


def test_a_file_locked_by_another_program_fails_begin_as_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect():
        pass  # the file exists, in WAL mode
    engine.dispose()

    @event.listens_for(engine, "connect")
    def _no_wait(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA busy_timeout=0")  # fail at once instead of in 30 s

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(OperationalError) as failed, engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        assert isinstance(failed.value, DATABASE_UNAVAILABLE)
        assert "BEGIN IMMEDIATE" in str(failed.value) and "locked" in str(failed.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()
