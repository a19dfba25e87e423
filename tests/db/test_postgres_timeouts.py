"""PostgreSQL connections fail instead of hanging: a connect timeout against a server that
accepts the TCP connection and never answers, and a server-side statement timeout."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from core.settings import Settings, get_settings
from db.session import make_engine, postgres_connect_args


@pytest.fixture
def short_limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MODELYARD_DATABASE_CONNECT_TIMEOUT_S", "1")
    monkeypatch.setenv("MODELYARD_DATABASE_STATEMENT_TIMEOUT_S", "0.5")
    get_settings.cache_clear()  # engines read the process's settings
    yield
    get_settings.cache_clear()


def test_connect_args_follow_the_settings() -> None:
    args = postgres_connect_args(
        Settings(database_connect_timeout_s=12, database_statement_timeout_s=30)
    )
    assert args["connect_timeout"] == 12 and args["tcp_user_timeout"] == 12_000
    assert args["keepalives"] == 1 and args["keepalives_idle"] == 6
    assert args["options"] == (
        "-c statement_timeout=30000 -c idle_in_transaction_session_timeout=30000"
    )
    assert "options" not in postgres_connect_args(
        Settings(database_statement_timeout_s=0, database_idle_in_transaction_s=0)
    )


def test_a_silent_server_fails_the_connect(short_limits: None) -> None:
    with socket.socket() as silent:  # accepts into its backlog, never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
        try:
            with pytest.raises(OperationalError), engine.connect():
                pass
        finally:
            engine.dispose()


def test_a_long_statement_is_cancelled_by_the_server(database_url: str, short_limits: None) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "500ms"
            with pytest.raises(OperationalError, match="statement timeout"):
                conn.execute(text("SELECT pg_sleep(5)"))
    finally:
        engine.dispose()
