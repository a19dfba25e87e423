"""Operations surfaces stay closed: Flower needs basic auth and binds to loopback;
a password-protected Redis works and its password shows up in no log and no response."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.harness import Stack, wait_for
from tests.support.services import RedisServer, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_PASSWORD = "s3cret-redis-pw-7f1c"
FLOWER_PASSWORD = "flower-pw-9d2e-long"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=REDIS_PASSWORD)
    server.start()
    yield server
    server.stop()


def flower_env(redis: RedisServer, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELYARD_")}
    env.update(
        MODELYARD_BROKER_URL=redis.url,
        MODELYARD_DATA_DIR=str(tmp),
        MODELYARD_DATABASE_URL=f"sqlite:///{tmp / 'm.db'}",
        **extra,
    )
    return env


def test_flower_refuses_to_start_without_credentials(
    locked_redis: RedisServer, tmp_path: Path
) -> None:
    for extra in ({}, {"MODELYARD_FLOWER_USER": "ops", "MODELYARD_FLOWER_PASSWORD": "short"}):
        done = subprocess.run(
            [sys.executable, "-m", "modelyard", "flower", "--port", str(free_port())],
            env=flower_env(locked_redis, tmp_path, **extra),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert "refusing to start Flower without basic auth" in done.stdout


def test_flower_answers_401_without_basic_auth(locked_redis: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "flower.log"
    env = flower_env(
        locked_redis,
        tmp_path,
        MODELYARD_FLOWER_USER="ops",
        MODELYARD_FLOWER_PASSWORD=FLOWER_PASSWORD,
        MODELYARD_FLOWER_PORT=str(port),
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelyard", "flower"], env=env, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"{base}/healthcheck", timeout=2).status_code in (200, 401)
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "flower listening")
        for path in ("/", "/api/workers", "/api/tasks", "/workers"):
            assert httpx.get(base + path, timeout=5).status_code == 401, path
            wrong = httpx.get(base + path, auth=("ops", "nope"), timeout=5)
            assert wrong.status_code == 401, path
        assert httpx.get(f"{base}/api/workers", auth=("ops", FLOWER_PASSWORD)).status_code == 200
        # docker-compose.yml's healthcheck probes this without credentials.
        assert httpx.get(f"{base}/healthcheck", timeout=5).text == "OK"
        with pytest.raises(httpx.ConnectError):  # loopback only
            httpx.get(f"http://{_non_loopback_address()}:{port}/", timeout=2)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert FLOWER_PASSWORD not in cmdline
    finally:
        proc.terminate()
        proc.wait(15)
    text = log.read_text(errors="replace")
    assert FLOWER_PASSWORD not in text and REDIS_PASSWORD not in text


def _non_loopback_address() -> str:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outward interface
            address: str = s.getsockname()[0]
        except OSError:
            pytest.skip("no non-loopback interface")
    if address.startswith("127."):
        pytest.skip("no non-loopback interface")
    return address


class _Touch:
    """Unpickling this runs `touch <marker>`: what a malicious pickle message would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_password_protected_redis_works_and_pickle_messages_are_discarded(
    locked_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import pickle

    from kombu import Connection

    from core.dispatch import TASK_RUN_JOB
    from core.enums import QUEUE_FOR_KIND, JobKind

    workdir = tmp_path_factory.mktemp("stack-auth")
    marker = workdir / "pwned"
    stack = Stack(workdir, f"sqlite:///{workdir / 'm.db'}", locked_redis.url, log_format="json")
    queue = QUEUE_FOR_KIND[JobKind.NOOP]
    try:
        stack.start_api()
        stack.start_beat()
        worker = stack.start_worker()
        with Connection(locked_redis.url) as conn:
            conn.Producer().publish(
                pickle.dumps(_Touch(marker)),
                exchange="",
                routing_key=queue,
                content_type="application/x-python-serialize",
                content_encoding="binary",
                headers={"task": TASK_RUN_JOB, "id": "evil-1", "lang": "py"},
            )
        wait_for(
            lambda: "untrusted content" in worker.log.read_text(errors="replace"),
            30,
            "the worker refusing the pickle message",
        )
        job = stack.submit({"duration_s": 0.1}, kind="noop")
        done = stack.wait_status(job["id"], ("succeeded", "failed", "cancelled"))
        assert done["status"] == "succeeded"  # the worker lives on and consumes
        assert worker.alive()
        assert locked_redis.client().llen(queue) == 0  # discarded, not left to loop
        with stack.client() as c:
            scraped = c.get("/metrics").text
            bodies = [
                scraped,
                c.get("/readyz").text,
                c.get(f"/v1/jobs/{job['id']}").text,
                c.get(f"/v1/jobs/{job['id']}/events").text,
                c.get("/openapi.json").text,
            ]
    finally:
        stack.stop()
    assert not marker.exists()
    text = worker.log.read_text().splitlines()
    lines = [json.loads(line) for line in text if line.startswith("{")]  # not the banner
    assert any(entry.get("job_id") == job["id"] for entry in lines)  # structured, per job
    up = [line for line in scraped.splitlines() if line.startswith("modelyard_worker_up{")]
    assert len(up) == 1 and up[0].endswith(" 1.0"), scraped  # the worker's heartbeat
    assert all(REDIS_PASSWORD not in body for body in bodies)
    logs = [p.read_text(errors="replace") for p in workdir.glob("*.log")]
    assert len(logs) >= 3 and sum(len(t) for t in logs) > 0
    assert all(REDIS_PASSWORD not in text for text in logs)
