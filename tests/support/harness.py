"""Real Modelyard processes for end-to-end tests: API, workers and beat."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from modelyard.cli import FORWARDED_COMMANDS
from modelyard.servers import module_argv
from tests.support.auth import TEST_RPM, bearer, make_key
from tests.support.services import free_port

TERMINAL = ("succeeded", "failed", "cancelled", "expired")


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._fh = log.open("ab")
        self.popen = subprocess.Popen(argv, env=env, stdout=self._fh, stderr=subprocess.STDOUT)
        self.killed_at: datetime | None = None  # when kill9() sent SIGKILL

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def identity(self) -> str:
        """The lease owner name a worker process uses (workers.context.worker_identity)."""
        return f"{socket.gethostname()}:{self.popen.pid}"

    @property
    def hostname(self) -> str:
        """The Celery node name `modelyard worker` gives this process."""
        return f"worker-{self.popen.pid}@{socket.gethostname()}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        self.killed_at = datetime.now(UTC)
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self._fh.close()

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def stop(self, timeout: float = 15) -> None:
        stop_together([self], timeout)

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def stop_together(procs: Sequence[Proc], timeout: float = 15) -> None:
    """SIGTERM to every process at once, then wait for each within one shared `timeout`
    (SIGKILL to those still running): a stack's processes shut down side by side, not one
    after the other."""
    for proc in procs:
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.popen.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(10)
        proc._fh.close()


class Stack:
    """API + workers + beat over the given database and broker, logs under `workdir`."""

    def __init__(self, workdir: Path, database_url: str, broker_url: str, **settings: str) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "MODELYARD_DATA_DIR": str(workdir / "data"),
            "MODELYARD_DATABASE_URL": database_url,
            "MODELYARD_BROKER_URL": broker_url,
            "MODELYARD_LEASE_TTL_S": "3",
            "MODELYARD_HEARTBEAT_INTERVAL_S": "0.5",
            "MODELYARD_RECONCILE_PERIOD_S": "1",
            "MODELYARD_REPUBLISH_GRACE_S": "1",
            "MODELYARD_RETRY_BACKOFF_S": "0.5",
            "MODELYARD_LOG_LEVEL": "INFO",
            "MODELYARD_REQUESTS_PER_MINUTE": TEST_RPM,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            **{f"MODELYARD_{k.upper()}": v for k, v in settings.items()},
        }
        self.api: Proc | None = None
        self.beat: Proc | None = None
        self.workers: list[Proc] = []
        self.base_url = ""
        self.database_url = database_url
        # An admin key of the default tenant, made once the API migrated the database;
        # `client()`, the CLI (MODELYARD_API_KEY) and the SDK use it.
        self.api_key = ""
        self._count = 0

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        """`modelyard <args>` as the server module it forwards to (`modelyard worker ...`
        execs `python -P -m workers.serve worker ...`): the same process, without first
        starting the CLI, which cost a second interpreter start and the CLI's imports in
        each of the suite's ~160 server processes (tests/e2e/test_up.py, test_cli.py and
        test_keys_cli.py run the CLI itself)."""
        self._count += 1
        log = self.workdir / f"{self._count:02d}-{name}.log"
        module = next(m for command, m, _ in FORWARDED_COMMANDS if command == args[0])
        return Proc(name, module_argv(module, *args), {**self.env, **(env or {})}, log)

    def start_api(self, address: str = "127.0.0.1", port: int | None = None) -> None:
        """Start the API bound to `address` (on `port`, else a free one) and wait until it
        is ready; the first call also makes the stack's API key."""
        port = port or free_port()
        self.api = self._spawn("api", "api", "--host", address, "--port", str(port))
        self.base_url = f"http://{address}:{port}"

        def ready() -> bool:
            assert self.api is not None
            if not self.api.alive():
                raise AssertionError("api exited:\n" + self.api.tail())
            try:
                return httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, "api /readyz")
        if not self.api_key:
            self.api_key = make_key(self.database_url)
            self.env["MODELYARD_API_KEY"] = self.api_key

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.api_key)

    def start_worker(
        self, wait_ready: bool = True, pool: str | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        """A worker; `env` overrides this worker's environment (MODELYARD_* settings)."""
        args = ["worker", *(("--pool", pool) if pool else ())]
        proc = self._spawn("worker", *args, env=env)
        self.workers.append(proc)
        if wait_ready:
            wait_for(lambda: self._logged(proc, " ready."), 60, "worker ready")
        return proc

    def start_beat(self) -> None:
        self.beat = self._spawn("beat", "beat")

    @staticmethod
    def _logged(proc: Proc, text: str) -> bool:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited:\n" + proc.tail())
        return text in proc.log.read_text(errors="replace")

    def stop_workers(self) -> None:
        stop_together(self.workers)
        self.workers.clear()

    @contextmanager
    def running(self, workers: int = 1, beat: bool = True) -> Iterator[Stack]:
        """API, then beat and `workers` workers; everything stopped on the way out."""
        try:
            self.start_api()
            if beat:
                self.start_beat()
            for _ in range(workers):
                self.start_worker()
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        stop_together([*self.workers, *(p for p in (self.beat, self.api) if p is not None)])
        self.workers.clear()

    def logs(self) -> str:
        return "\n\n".join(
            f"== {p.name} ({p.log.name})\n{p.tail(60)}"
            for p in [*self.workers, *(x for x in (self.api, self.beat) if x)]
        )

    # HTTP helpers
    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, headers=self.headers)

    def submit(self, spec: dict[str, Any], **body: Any) -> dict[str, Any]:
        with self.client() as c:
            r = c.post("/v1/jobs", json={"kind": "generate", "spec": spec, **body})
        assert r.status_code == 202, r.text
        job: dict[str, Any] = r.json()
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        with self.client() as c:
            r = c.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        return job

    def outputs(self, job_id: str) -> list[dict[str, Any]]:
        with self.client() as c:
            data: list[dict[str, Any]] = c.get(f"/v1/jobs/{job_id}/outputs").json()["data"]
        return data

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self.client() as c:
            data: list[dict[str, Any]] = c.get(
                f"/v1/jobs/{job_id}/events", params={"limit": 500}
            ).json()["data"]
        return data

    def wait_status(
        self, job_id: str, statuses: tuple[str, ...], timeout: float = 90
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        try:
            result: dict[str, Any] = wait_for(check, timeout, f"job {job_id} in {statuses}", 0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None
        return result
