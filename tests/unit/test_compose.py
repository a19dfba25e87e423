"""docker-compose.yml is a valid Compose file that runs what the settings understand.

Validated with the compose-spec library (the Rust `compose_spec` parser); where the
`docker compose` plugin is installed, `docker compose config` must accept it too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from compose_spec import PyOptions

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MODELYARD_SERVICES = {"api", "worker", "beat", "flower"}
S3_SERVICES = {"minio", "minio-bucket"}  # the optional `s3` profile


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    parsed = PyOptions(apply_merge=True).from_yaml((ROOT / "docker-compose.yml").read_text())
    parsed.validate()  # every named volume, network, config and secret is declared
    result: dict[str, Any] = parsed.to_dict()
    return result


def test_the_services_and_their_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == MODELYARD_SERVICES | {"redis", "postgres"} | S3_SERVICES
    for name in ("api", "worker", "flower", "redis", "postgres"):
        assert services[name]["healthcheck"]["test"], name
    # the worker and beat start once the API has migrated the database
    for name in ("worker", "beat"):
        assert services[name]["depends_on"]["api"]["condition"] == "service_healthy"
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for name in MODELYARD_SERVICES:
        assert "data:/data" in services[name]["volumes"], name  # one shared artifact volume
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]


def test_every_modelyard_variable_is_a_setting(compose: dict[str, Any]) -> None:
    known = {f"MODELYARD_{name.upper()}" for name in Settings.model_fields}
    for name in MODELYARD_SERVICES:
        env = compose["services"][name]["environment"]
        unknown = {k for k in env if k.startswith("MODELYARD_")} - known
        assert not unknown, (name, unknown)
        assert env["MODELYARD_DATA_DIR"] == "/data"


def test_minio_is_optional_and_the_services_share_its_credentials(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    for name in S3_SERVICES:
        assert services[name]["profiles"] == ["s3"], name  # not started without the profile
    for name in MODELYARD_SERVICES | {"redis", "postgres"}:
        assert "profiles" not in services[name], name
    minio = services["minio"]
    assert minio["healthcheck"]["test"]
    assert services["minio-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "127.0.0.1:9001:9001" in minio["ports"]  # the console on loopback only
    assert minio["environment"] == {
        "MINIO_ROOT_USER": "${AWS_ACCESS_KEY_ID:-}",
        "MINIO_ROOT_PASSWORD": "${AWS_SECRET_ACCESS_KEY:-}",
    }
    for name in MODELYARD_SERVICES:
        env = services[name]["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == "${AWS_ACCESS_KEY_ID:-}", name
        assert env["AWS_SECRET_ACCESS_KEY"] == "${AWS_SECRET_ACCESS_KEY:-}", name
        assert env["MODELYARD_STORAGE_URL"] == "${MODELYARD_STORAGE_URL:-}", name
        assert env["MODELYARD_STORAGE_OPTIONS"] == "${MODELYARD_STORAGE_OPTIONS:-{}}", name
    # what those defaults interpolate to leaves shared storage off
    monkeypatch.setenv("MODELYARD_STORAGE_URL", "")
    monkeypatch.setenv("MODELYARD_STORAGE_OPTIONS", "{}")
    settings = Settings()
    assert settings.storage_url == "" and settings.storage_options == {}


def test_the_cpu_image_installs_the_pinned_cpu_torch_and_every_package(
    compose: dict[str, Any],
) -> None:
    dockerfile = compose["services"]["api"]["build"]["dockerfile_inline"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = next(d for d in project["project"]["dependencies"] if d.startswith("torch=="))
    torch_line = next(line for line in dockerfile.splitlines() if "torch==" in line)
    assert pinned in torch_line and "download.pytorch.org/whl/cpu" in torch_line
    assert dockerfile.index(pinned) < dockerfile.index("pip install '.")
    copied = set(re.findall(r"^COPY (\w+) \1$", dockerfile, re.M))
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied
    extras = re.search(r"pip install '\.\[([a-z0-9,]+)\]'", dockerfile)
    assert extras is not None
    assert set(extras.group(1).split(",")) <= set(project["project"]["optional-dependencies"])
    assert "USER modelyard" in dockerfile


def test_docker_compose_config_accepts_it_where_the_plugin_is_installed() -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], capture_output=True).returncode
    ):
        pytest.skip("the docker compose plugin is not installed here (compose-spec validated it)")
    done = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "MODELYARD_FLOWER_PASSWORD": "x" * 16},
    )
    assert done.returncode == 0, done.stderr
