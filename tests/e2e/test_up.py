"""`modelyard up` (the README's quickstart): API, worker and beat in one command; a job
runs; SIGTERM stops every process it started (docker stop / systemd send SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from modelyard.client import Client
from tests.support.harness import wait_for
from tests.support.services import RedisServer, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_up_runs_a_job_and_sigterm_stops_everything(broker: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MODELYARD_DATA_DIR": str(tmp_path / "data"),
        "MODELYARD_BROKER_URL": broker.url,
        "MODELYARD_DATABASE_URL": "",
        "MODELYARD_HEARTBEAT_INTERVAL_S": "0.5",
    }
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "up", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    started: list[int] = []
    try:

        def ready() -> bool:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 90, "modelyard up answering /readyz")
        scopes = ["--scope", "jobs:read", "--scope", "jobs:write"]
        key = subprocess.run(
            [sys.executable, "-m", "modelyard", "keys", "create", "--name", "me", *scopes],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        with Client(base, api_key=key) as client:
            job = client.wait(client.submit("noop", {"duration_s": 0.2})["id"], timeout=60)
        assert job["status"] == "succeeded"
        started = _children(up.pid)
        assert len(started) >= 3  # api, worker, beat
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        wait_for(lambda: not any(_alive(pid) for pid in started), 30, "children stopped")
    finally:
        if up.poll() is None:
            up.kill()
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()
