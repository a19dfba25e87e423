"""The database's clock, for every comparison that more than one host makes.

Leases (a job's, a leader's) are written by one host and judged by another; when each
reads its own clock, a host a minute off loses live leases or keeps dead ones. These
expressions are evaluated by the database server, so every host agrees on "now".

Values follow the UTCDateTime convention (naive UTC): on PostgreSQL
`timezone('UTC', statement_timestamp())`, on SQLite the same text layout SQLAlchemy
writes (`YYYY-MM-DD HH:MM:SS.ffffff`), so columns and these compare correctly.

SQLite's clock counts whole milliseconds while this host writes microseconds, so on
SQLite "now" is the last microsecond of the current millisecond: a time this host wrote
before the statement (a job's `available_at`) is never after it. Rounded down, a job
claimed in the millisecond it was queued was "not yet due". Within one statement "now"
does not move, as PostgreSQL's `statement_timestamp()` does not.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Float, bindparam, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from db.base import UTCDateTime

_SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now'{modifier}) || '999'"


class _DbNow(FunctionElement[datetime]):
    """The database server's current UTC time, plus `offset_s` seconds."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"

    def __init__(self, offset_s: ColumnElement[float] | None = None) -> None:
        args = () if offset_s is None else (offset_s,)
        super().__init__(*args)


@compiles(_DbNow)
def _postgresql(element: _DbNow, compiler: Any, **kw: Any) -> str:
    now = "timezone('UTC', statement_timestamp())"
    clauses = list(element.clauses)
    if not clauses:
        return now
    return f"({now} + make_interval(secs => {compiler.process(clauses[0], **kw)}))"


@compiles(_DbNow, "sqlite")
def _sqlite(element: _DbNow, compiler: Any, **kw: Any) -> str:
    clauses = list(element.clauses)
    if not clauses:
        return f"({_SQLITE_NOW.format(modifier='')})"
    modifier = f", printf('%+.6f seconds', {compiler.process(clauses[0], **kw)})"
    return f"({_SQLITE_NOW.format(modifier=modifier)})"


def db_now() -> ColumnElement[datetime]:
    """SQL for the database's current time."""
    return _DbNow()


def db_time_after(seconds: float) -> ColumnElement[datetime]:
    """SQL for the database's current time plus `seconds` (negative: before)."""
    return _DbNow(bindparam(None, float(seconds), type_=Float()))


def db_time_after_param(name: str) -> ColumnElement[datetime]:
    """`db_time_after`, its seconds given at execution as the bind parameter `name` (for a
    statement built once)."""
    return _DbNow(bindparam(name, type_=Float()))


def database_now(session: Session) -> datetime:
    """The database's current time, read once (for code that must compute with it)."""
    value = session.execute(select(db_now())).scalar_one()
    assert isinstance(value, datetime)
    return value
