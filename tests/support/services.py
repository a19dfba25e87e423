"""Real services for tests: throwaway databases, Redis db indexes and Redis servers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
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
    """An unused db index on the shared Redis, reserved for this test run. The reservation
    is a key in db 0, which no test uses: tests FLUSHDB their own index, and a reservation
    kept there would go with it, letting another process take the same index."""
    owner = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    registry = redis.Redis.from_url(f"{SHARED_REDIS}/0", socket_connect_timeout=2)
    try:
        for index in range(1, 16):
            reservation = f"modelyard:test:db-index:{index}"
            try:
                taken = registry.set(reservation, owner, nx=True, ex=3600)
            except redis.ConnectionError:
                missing_service("Redis at " + SHARED_REDIS)
            if not taken:
                continue
            client = redis.Redis.from_url(f"{SHARED_REDIS}/{index}", socket_connect_timeout=2)
            try:
                client.flushdb()
                yield f"{SHARED_REDIS}/{index}"
            finally:
                client.flushdb()
                client.close()
                if registry.get(reservation) == owner.encode():
                    registry.delete(reservation)
            return
        pytest.fail("every Redis db index 1-15 is reserved by another test run")
    finally:
        registry.close()


def in_netns(netns: str | None, argv: list[str], user: str | None = None) -> list[str]:
    """`argv` run inside the network namespace `netns` (as `user`), or as it is without one."""
    if netns is None:
        return argv
    as_user = ("setpriv", "--reuid", user, "--regid", user, "--init-groups") if user else ()
    return ["ip", "netns", "exec", netns, *as_user, *argv]


class RedisServer:
    """A private redis-server on its own port (for FLUSHALL, restarts and kills). `host` and
    `netns` put it on another address inside a network namespace (tests/support/netns.py)."""

    def __init__(
        self,
        workdir: Path,
        password: str | None = None,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            missing_service("redis-server binary")
        assert binary is not None
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.password = password
        self.host = host
        self.netns = netns
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}{host}:{self.port}/0"

    def start(self, *, aof: bool = False) -> None:
        """Start the server; `aof` turns on the append-only file, fsynced every second."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        persistence = ("--appendonly", "yes", "--appendfsync", "everysec") if aof else ()
        self.proc = subprocess.Popen(
            in_netns(
                self.netns,
                [
                    *(self.binary, "--port", str(self.port), "--bind", self.host),
                    *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
                    *persistence,
                    *(("--requirepass", self.password) if self.password else ()),
                ],
            ),
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

    def kill9(self) -> None:
        """SIGKILL: the server writes nothing more (its files hold what it wrote so far)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def shutdown(self, *, keep_data: bool) -> None:
        """Stop the server; `keep_data` saves its dataset to disk first (loaded at the next
        start), otherwise everything in it is gone, as after a restart without persistence."""
        dump = self.workdir / "dump.rdb"
        if self.proc is None:
            return
        client = self.client()
        try:
            client.shutdown(save=keep_data, nosave=not keep_data)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        self.proc.wait(10)
        self.proc = None
        if not keep_data:
            dump.unlink(missing_ok=True)


def postgres_bindir() -> Path | None:
    """The directory of `initdb` and `postgres`: pg_config's, else the newest Debian one."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    return None


class PostgresCluster:
    """A private PostgreSQL server (its own initdb data directory and port) that a test may
    stop and start without touching the shared one on 5432. As root, the server runs as
    the `postgres` user (PostgreSQL refuses to run as root). `host` and `netns` put it on
    another address inside a network namespace, open (trust) to the `clients` network."""

    def __init__(
        self, host: str = "127.0.0.1", netns: str | None = None, clients: str | None = None
    ) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            missing_service("PostgreSQL server binaries (initdb, postgres)")
        assert bindir is not None
        self.bindir = bindir
        self.user: str | None = None
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                missing_service("a `postgres` user to run a private PostgreSQL as root")
            self.user = "postgres"
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="modelyard-pg-"))
        self.datadir = self.root / "data"
        self.log = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = host
        self.netns = netns
        self.clients = clients
        self.admin_url = f"postgresql://postgres@{host}:{self.port}/postgres"

    def _owned(self, path: Path) -> None:
        if self.user is not None:
            shutil.chown(path, self.user, self.user)

    def init(self) -> None:
        self._owned(self.root)
        with self.log.open("ab") as log:
            subprocess.run(
                [
                    str(self.bindir / "initdb"),
                    *("-D", str(self.datadir), "-U", "postgres", "-A", "trust"),
                    *("--no-sync", "--no-instructions", "-E", "UTF8", "--locale", "C"),
                ],
                user=self.user,
                stdout=log,
                stderr=log,
                check=True,
            )
        if self.clients is not None:
            with (self.datadir / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {self.clients} trust\n")

    def start(self, timeout: float = 30) -> None:
        log = self.log.open("ab")
        argv = [
            str(self.bindir / "postgres"),
            *("-D", str(self.datadir), "-p", str(self.port), "-k", str(self.root)),
            *("-c", f"listen_addresses={self.host}", "-c", "fsync=off"),
            *("-c", "synchronous_commit=off", "-c", "full_page_writes=off"),
            *("-c", "max_connections=300"),
        ]
        # `ip netns exec` needs root: the user switch comes after it, inside the namespace
        self.proc = subprocess.Popen(
            in_netns(self.netns, argv, self.user),
            user=self.user if self.netns is None else None,
            stdout=log,
            stderr=log,
        )
        log.close()
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.admin_url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "private PostgreSQL did not start:\n" + self.log.read_text()[-2000:]
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as when the server goes away."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)
        self.proc = None

    def create_database(self, name: str) -> str:
        """A new database; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{name}"

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


IPTABLES_COMMENT = "modelyard-test-packet-drop"


@contextmanager
def packets_dropped(port: int) -> Iterator[None]:
    """Every TCP packet to or from `port` on loopback dropped while inside: a server
    black-holed by the network (no refusal, no reset), not a stopped one. iptables rules
    on INPUT for that port only, removed on the way out whatever happened; needs root."""
    iptables = shutil.which("iptables")
    if iptables is None or os.geteuid() != 0:
        missing_service("iptables as root (apt-get install iptables)")
    assert iptables is not None
    comment = ("-m", "comment", "--comment", IPTABLES_COMMENT)
    rules = [
        ["INPUT", "-i", "lo", "-p", "tcp", f"--{end}", str(port), *comment, "-j", "DROP"]
        for end in ("dport", "sport")
    ]
    added: list[list[str]] = []
    try:
        for rule in rules:
            subprocess.run([iptables, "-I", *rule], check=True, capture_output=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run([iptables, "-D", *rule], check=True, capture_output=True)
