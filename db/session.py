"""Engine, sessions and migrations for SQLite (WAL) and PostgreSQL."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings, get_settings

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
# The database cannot be reached (down, restarting, connection cut, pool exhausted, or a
# SQLite file locked past its busy timeout): worth waiting for, unlike a bad statement.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
)
_MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()


def _begin_on_driver(conn: Any, statement: str) -> None:
    """Run BEGIN on the sqlite3 connection itself: through SQLAlchemy's statement path it
    cost about a fifth of a short transaction's begin and commit, once per transaction. A
    failure is raised as SQLAlchemy would have wrapped it (a locked file is an
    OperationalError, as DATABASE_UNAVAILABLE expects)."""
    dbapi_conn = conn.connection.dbapi_connection
    try:
        dbapi_conn.execute(statement)
    except sqlite3.Error as exc:
        raise sa_exc.DBAPIError.instance(statement, (), exc, sqlite3.Error) from exc


def _sqlite_begin(conn: Any) -> None:
    # Take the write lock at BEGIN so two writers queue on busy_timeout instead
    # of failing with "database is locked" when a read upgrades to a write.
    _begin_on_driver(conn, "BEGIN IMMEDIATE")


class _WriteGate:
    """Queues SQLite writers, of this process and of the others, before BEGIN IMMEDIATE.

    SQLite's busy handler sleeps and retries with growing pauses, so under many
    concurrent writers a transaction can wait far longer than its turn. Writers
    take turns instead: a lock among this process's threads, then an exclusive
    `flock` on a file beside the database among processes (the kernel wakes the
    next waiter at once, and drops the lock of a process that dies).
    A plain Lock, not an RLock: a transaction may end on another thread than the one
    that began it (FastAPI closes a request's session in a pool thread). So a thread
    must not open a second write transaction while its first is still open."""

    def __init__(self, lock_path: Path | None) -> None:
        self._lock = threading.Lock()
        self._lock_path = lock_path
        self._fd: int | None = None
        self._pid = 0

    def after_fork(self) -> None:
        """In a forked child: a lock another thread of the parent held is free here."""
        self._lock = threading.Lock()
        self._fd = None

    def _file(self) -> int | None:
        if self._lock_path is None:
            return None
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def begin(self, conn: Any) -> None:
        self._lock.acquire()
        conn.info["write_gate"] = True
        try:
            fd = self._file()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
                conn.info["write_gate_fd"] = fd
            _sqlite_begin(conn)
        except BaseException:
            self.end(conn)
            raise

    def commit(self, conn: Any) -> None:
        """SQLAlchemy's commit event comes before the COMMIT: commit here, then let the next
        writer in (the dialect's own commit afterwards finds no transaction and does nothing)."""
        try:
            if conn.info.get("write_gate"):
                conn.connection.dbapi_connection.commit()
        finally:
            self.end(conn)

    def rollback(self, conn: Any) -> None:
        try:
            if conn.info.get("write_gate"):
                conn.connection.dbapi_connection.rollback()
        finally:
            self.end(conn)

    def end(self, conn: Any) -> None:
        fd = conn.info.pop("write_gate_fd", None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if conn.info.pop("write_gate", False):
            self._lock.release()


def _sqlite_begin_read(conn: Any) -> None:
    # Readers never take the write lock: in WAL mode they see a snapshot and
    # neither wait for nor block writers.
    _begin_on_driver(conn, "BEGIN")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps_json(value: Any) -> str:
    """JSON columns hold standard JSON: NaN and infinities (a perplexity of inf) become null.

    PostgreSQL refuses them outright and SQLite would store non-standard tokens."""
    return json.dumps(_finite(value))


_ENGINES: list[Engine] = []
_GATES: list[_WriteGate] = []


def _after_fork_in_child() -> None:
    """A forked child (a prefork pool process) must not use its parent's connections, which
    background threads of the parent (the recovery lease) keep using."""
    for engine in _ENGINES:
        engine.dispose(close=False)
    for gate in _GATES:
        gate.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def make_engine(url: str, *, readonly: bool = False) -> Engine:
    """An engine; `readonly` ones (SQLite) begin deferred transactions that never write."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            pool_size=8,
            max_overflow=16,
            json_serializer=dumps_json,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling is replaced by explicit BEGIN IMMEDIATE.
        event.listen(
            engine,
            "connect",
            lambda dbapi_conn, _rec: setattr(dbapi_conn, "isolation_level", None),
        )
        if readonly:
            event.listen(engine, "begin", _sqlite_begin_read)
        else:
            on_disk = parsed.database and parsed.database != ":memory:"
            gate = _WriteGate(Path(f"{parsed.database}-writelock") if on_disk else None)
            _GATES.append(gate)
            event.listen(engine, "begin", gate.begin)
            event.listen(engine, "commit", gate.commit)
            event.listen(engine, "rollback", gate.rollback)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=20,
        json_serializer=dumps_json,
        connect_args=postgres_connect_args(get_settings()),
    )


def postgres_connect_args(settings: Settings) -> dict[str, Any]:
    """libpq options: a connect timeout; keepalives and a TCP user timeout, so a connection
    to a database that went silent (packets dropped, not refused) fails within the connect
    timeout instead of the kernel's many minutes; a server-side statement timeout."""
    limit = settings.database_connect_timeout_s
    idle = max(1, int(limit / 2))
    args: dict[str, Any] = {
        "connect_timeout": max(1, math.ceil(limit)),
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": max(1, int(limit / 6)),
        "keepalives_count": 3,
        "tcp_user_timeout": int(limit * 1000),
    }
    options = []
    if settings.database_statement_timeout_s > 0:
        options.append(f"-c statement_timeout={int(settings.database_statement_timeout_s * 1000)}")
    if settings.database_idle_in_transaction_s > 0:
        ms = int(settings.database_idle_in_transaction_s * 1000)
        options.append(f"-c idle_in_transaction_session_timeout={ms}")
    if options:
        args["options"] = " ".join(options)
    return args


@lru_cache(maxsize=16)
def get_engine(url: str, readonly: bool = False) -> Engine:
    if readonly and make_url(url).get_backend_name() != "sqlite":
        return get_engine(url)  # one pool serves both on a server database
    engine = make_engine(url, readonly=readonly)
    _ENGINES.append(engine)
    return engine


@lru_cache(maxsize=16)
def get_sessionmaker(url: str, readonly: bool = False) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url, readonly), expire_on_commit=False)


@contextmanager
def session_scope(url: str, *, readonly: bool = False) -> Iterator[Session]:
    """A transaction: commits on success, rolls back on error."""
    session = get_sessionmaker(url, readonly)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@lru_cache(maxsize=16)
def _autocommit_sessionmaker(url: str) -> sessionmaker[Session]:
    engine = get_engine(url).execution_options(isolation_level="AUTOCOMMIT")
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def autocommit_scope(url: str) -> Iterator[Session]:
    """A session whose every statement commits on its own as the server runs it, on a server
    database: a connection cut after a statement leaves no transaction open on the server,
    so the rows it updated are not locked until the server notices the session is gone
    (idle_in_transaction_session_timeout, 30 s by default here). For single-statement
    compare-and-sets that other hosts wait on (a leader lease). SQLite, local to its
    host, cannot be cut off and gets an ordinary transaction (`session_scope`)."""
    if make_url(url).get_backend_name() == "sqlite":
        with session_scope(url) as session:
            yield session
        return
    session = _autocommit_sessionmaker(url)()
    try:
        yield session
    finally:
        session.close()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> None:
    """Bring the schema to the newest revision (`alembic upgrade head`)."""
    logger.info("migrating database to head")
    command.upgrade(alembic_config(url), "head")
