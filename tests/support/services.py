"""Real services for tests: throwaway databases, Redis db indexes and Redis servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

PG_ADMIN_URL = os.environ.get("MODELYARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
SHARED_REDIS = os.environ.get("MODELYARD_TEST_REDIS", "redis://127.0.0.1:6379")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_service(what: str) -> None:
    """A missing service skips a test locally and fails it under CI=true."""
    if IN_CI:
        pytest.fail(f"{what} is not available (required under CI)")
    pytest.skip(f"{what} is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards; yields its SQLAlchemy URL."""
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except Exception:
        missing_service("PostgreSQL at " + PG_ADMIN_URL)
        raise
    name = f"modelyard_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        yield url
    finally:
        from db.session import get_engine

        get_engine(url).dispose()  # close pooled connections before the database goes
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextmanager
def redis_db_index() -> Iterator[str]:
    """An unused db index on the shared Redis, reserved for this test run."""
    owner = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    for index in range(1, 16):
        client = redis.Redis.from_url(f"{SHARED_REDIS}/{index}", socket_connect_timeout=2)
        try:
            if client.set("modelyard:test:owner", owner, nx=True, ex=3600):
                client.flushdb()
                client.set("modelyard:test:owner", owner, ex=3600)
                try:
                    yield f"{SHARED_REDIS}/{index}"
                finally:
                    client.flushdb()
                return
        except redis.ConnectionError:
            missing_service("Redis at " + SHARED_REDIS)
        finally:
            client.close()
    pytest.fail("every Redis db index 1-15 is reserved by another test run")


class RedisServer:
    """A private redis-server on its own port (for FLUSHALL, restarts and kills)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            missing_service("redis-server binary")
        assert binary is not None
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
