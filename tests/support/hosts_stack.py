"""A Modelyard stack spread over test hosts (tests/support/netns.py).

The control host runs a private PostgreSQL (services.PostgresCluster listening on the
control address, open to the run's network only), a private Redis (services.RedisServer,
likewise), the API and beat; each worker host runs `workers.serve worker` processes with its
own data dir. This process reaches them through the run's bridge address, as a client on the
same network would. A private PostgreSQL in the control namespace is simpler and sturdier
than a listener facing the namespaces for the shared server on 127.0.0.1:5432: cutting a
host off then cuts it off from the database as well as from Redis, with nothing in between
to fail, and the shared server is not touched.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from modelyard import servers
from tests.support.harness import Proc, Stack, wait_for
from tests.support.netns import Host, Hosts
from tests.support.services import PostgresCluster, RedisServer

logger = logging.getLogger(__name__)

API_PORT = 8000


# Short leases and periods for hosts tests and bench.scaleout (as the fault rows use): a
# cut-off host's job is taken over within seconds, and a cut-off worker's database
# connections count as lost after 3 s.
SHORT_LEASES = {
    "lease_ttl_s": "3",
    "heartbeat_interval_s": "0.5",
    "reconcile_period_s": "1",
    "republish_grace_s": "1",
    "retry_backoff_s": "0.5",
    "stop_grace_s": "3",
    "database_connect_timeout_s": "3",
}


class HostsStack(Stack):
    """harness.Stack's API, beat and workers, each process started inside its host."""

    def __init__(
        self, hosts: Hosts, workdir: Path, database_url: str, broker_url: str, **settings: str
    ) -> None:
        super().__init__(workdir, database_url, broker_url, **settings)
        self.hosts = hosts
        self.host_of: dict[int, Host] = {}  # worker pid -> its host

    def _spawn_on(self, host: Host, name: str, *args: str, env: dict[str, str] | None) -> Proc:
        self._count += 1
        log = self.workdir / f"{self._count:02d}-{host.name}-{name}.log"
        environment = {**self.env, "MODELYARD_DATA_DIR": str(host.data_dir / "data"), **(env or {})}
        module = servers.API if name == "api" else servers.WORKERS
        proc = Proc(
            f"{host.name}-{name}", host.argv(*servers.module_argv(module, *args)), environment, log
        )
        logger.info("started %s on %s (pid %s)", name, host.name, proc.pid)
        return proc

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        return self._spawn_on(self.hosts.control, name, *args, env=env)

    def start_api(self, address: str = "", port: int | None = None) -> None:
        """The API on the control host's address, where every host reaches it."""
        super().start_api(address or self.hosts.control.address, port or API_PORT)

    def start_worker_on(
        self,
        host: Host,
        env: dict[str, str] | None = None,
        pool: str | None = None,
        wait_ready: bool = True,
    ) -> Proc:
        """A worker on `host` (`env` overrides its environment), ready unless told not to wait."""
        args = ["worker", *(("--pool", pool) if pool else ())]
        proc = self._spawn_on(host, "worker", *args, env=env)
        self.workers.append(proc)
        self.host_of[proc.pid] = host
        if wait_ready:
            wait_for(lambda: self._logged(proc, " ready."), 60, f"worker on {host.name} ready")
        return proc

    def start_worker(
        self, wait_ready: bool = True, pool: str | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        """A worker on the worker host that runs the fewest live ones."""
        host = min(
            self.hosts.workers,
            key=lambda h: sum(p.alive() and self.host_of[p.pid] is h for p in self.workers),
        )
        return self.start_worker_on(host, env, pool, wait_ready)

    def worker_of(self, host: Host) -> Proc | None:
        """The live worker on `host`, if any."""
        return next((p for p in self.workers if p.alive() and self.host_of[p.pid] is host), None)

    def host_named(self, identity: str) -> Host:
        """The host of the worker whose lease owner name is `identity` (host:pid)."""
        return self.host_of[int(identity.rsplit(":", 1)[1])]

    @contextmanager
    def redis_blocked(self) -> Iterator[None]:
        """Redis's port on the control host dropped for packets from the worker hosts only
        (iptables DROP inside the control host), for the body.

        The API and beat reach Redis through the control address from inside the control
        host (over its loopback interface, source the control address), so a rule on the
        worker hosts' own addresses leaves them connected: jobs submitted meanwhile are
        published."""
        port = str(urlsplit(self.env["MODELYARD_BROKER_URL"]).port)
        rules = [
            ["INPUT", "-p", "tcp", "--dport", port, "-s", host.address, "-j", "DROP"]
            for host in self.hosts.workers
        ]
        iptables = ["ip", "netns", "exec", self.hosts.control.netns, "iptables"]
        for rule in rules:
            subprocess.run([*iptables, "-I", *rule], check=True)
        try:
            yield
        finally:
            for rule in rules:
                subprocess.run([*iptables, "-D", *rule], check=True)


@contextmanager
def hosts_stack(hosts: Hosts, workdir: Path, **settings: str) -> Iterator[HostsStack]:
    """PostgreSQL, Redis, the API and beat on the control host, one worker on each worker
    host; everything stopped and removed on the way out."""
    control = hosts.control
    pg = PostgresCluster(host=control.address, netns=control.netns, clients=str(hosts.network))
    # a password, since Redis answers a client that is not on loopback only with one
    broker = RedisServer(
        control.data_dir / "redis",
        password=secrets.token_hex(8),
        host=control.address,
        netns=control.netns,
    )
    stack: HostsStack | None = None
    try:
        pg.init()
        pg.start()
        database_url = pg.create_database("modelyard")
        broker.start()
        stack = HostsStack(hosts, workdir, database_url, broker.url, **settings)
        stack.start_api()
        stack.start_beat()
        for host in hosts.workers:
            stack.start_worker_on(host)
        yield stack
    finally:
        if stack is not None:
            stack.stop()
        broker.stop()
        pg.destroy()
