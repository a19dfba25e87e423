"""The API process never loads torch or transformers, not even when it checks a generate
job's prompts against a local model's tokenizer (DESIGN: api/ never imports torch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_MODEL, install_tiny_model
from tests.support.auth import bearer, make_key
from tests.support.harness import wait_for
from tests.support.module_report import TERMINATED
from tests.support.services import free_port, redis_db_index

# What the API imports does not depend on the database backend.
BACKENDS = ["sqlite"]
TORCH_LIBRARIES = ("libtorch", "libc10")
# What `modelyard api --port N` execs (modelyard/servers.py).
API_COMMAND = ("api.serve", "api", "--port")


class ApiProcess:
    def __init__(self, popen: subprocess.Popen[bytes], base_url: str, report: Path) -> None:
        self.popen = popen
        self.base_url = base_url
        self.report = report

    def mapped_files(self) -> set[str]:
        """Every file mapped into the process (shared libraries included), from the kernel."""
        lines = Path(f"/proc/{self.popen.pid}/maps").read_text().splitlines()
        return {
            fields[5] for fields in (line.split(maxsplit=5) for line in lines) if len(fields) > 5
        }

    def stop(self) -> set[str]:
        """SIGTERM it as an orchestrator would; the modules it had imported."""
        self.popen.send_signal(signal.SIGTERM)
        assert self.popen.wait(timeout=30) == TERMINATED
        return set(self.report.read_text().split())


@pytest.fixture
def api_process(database_url: str, tmp_path: Path, tiny_model_dir: Path) -> Iterator[ApiProcess]:
    data_dir = tmp_path / "data"
    install_tiny_model(tiny_model_dir, data_dir)
    port = free_port()
    report = tmp_path / "modules.txt"
    log = (tmp_path / "api.log").open("wb")
    with redis_db_index() as broker_url:
        env = {
            **os.environ,
            "MODELYARD_DATA_DIR": str(data_dir),
            "MODELYARD_DATABASE_URL": database_url,
            "MODELYARD_BROKER_URL": broker_url,
            "HF_HUB_OFFLINE": "1",
            "MODULE_REPORT": str(report),
        }
        popen = subprocess.Popen(
            [sys.executable, "-m", "tests.support.module_report", *API_COMMAND, str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if popen.poll() is not None:
                raise AssertionError((tmp_path / "api.log").read_text())
            try:
                return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(ready, 60, "api /readyz")
            yield ApiProcess(popen, base_url, report)
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
            log.close()


def test_the_api_accepts_a_generate_job_without_loading_torch(
    api_process: ApiProcess, database_url: str
) -> None:
    headers = bearer(make_key(database_url))
    with httpx.Client(base_url=api_process.base_url, headers=headers, timeout=30) as client:
        accepted = client.post(
            "/v1/jobs", json={"kind": "generate", "spec": {"model": TINY_MODEL, "prompts": ["Hi"]}}
        )
        assert accepted.status_code == 202, accepted.text
        too_long = client.post(
            "/v1/jobs",
            json={
                "kind": "generate",
                "spec": {"model": TINY_MODEL, "prompts": ["Hi"], "max_new_tokens": 4096},
            },
        )
        # The prompt was counted with the model's tokenizer, in this process.
        assert too_long.status_code == 422, too_long.text
        assert "context" in too_long.json()["error"]["message"]

    mapped = api_process.mapped_files()
    assert any("tokenizers" in path for path in mapped)  # the tokenizer's library is loaded
    assert not [path for path in mapped if any(lib in path for lib in TORCH_LIBRARIES)]

    modules = api_process.stop()
    assert {"api.main", "api.tokenizers", "tokenizers"} <= modules
    top_level = {name.partition(".")[0] for name in modules}
    assert not top_level & {"torch", "transformers", "peft", "accelerate"}
