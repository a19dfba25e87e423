"""`modelyard tenants create` and `modelyard keys create|list|revoke` work on the
database with no key at all, and the keys they make are the ones the API accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings
from tests.support.auth import bearer
from tests.support.services import redis_db_index

pytestmark = [pytest.mark.e2e]


def modelyard(database_url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MODELYARD_DATABASE_URL": database_url,
        "MODELYARD_DATA_DIR": str(data_dir),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_first_key_from_the_cli_then_revoked(database_url: str, tmp_path: Path) -> None:
    def run(*args: str) -> str:
        done = modelyard(database_url, tmp_path, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    tenant_id = run("tenants", "create", "acme", "--max-running-jobs", "2")
    assert tenant_id.startswith("ten_")
    key = run("keys", "create", "--tenant", "acme", "--name", "ci", "--scope", "jobs:read")
    assert key.startswith("my_")
    listed = run("keys", "list", "--tenant", "acme")
    assert key[:11] in listed and key not in listed and "jobs:read" in listed
    (as_json,) = json.loads(run("keys", "list", "--tenant", "acme", "--json"))
    assert (
        as_json["name"] == "ci" and as_json["tenant"] == tenant_id and as_json["revoked_at"] is None
    )
    assert key not in json.dumps(as_json)  # only the prefix, never the key
    tenants = {t["name"]: t for t in json.loads(run("tenants", "list", "--json"))}
    assert (
        tenants["acme"]["max_running_jobs"] == 2 and tenants["default"]["max_running_jobs"] is None
    )
    bad = modelyard(database_url, tmp_path, "keys", "create", "--name", "x", "--scope", "root")
    assert bad.returncode == 2 and "scopes must be" in bad.stderr

    with redis_db_index() as broker_url:
        settings = Settings(
            data_dir=tmp_path,
            database_url=database_url,
            broker_url=broker_url,
            api_key_cache_s=0.5,
        )
        with TestClient(create_app(settings)) as client:
            assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
            key_id = next(line.split()[1] for line in listed.splitlines() if "key_" in line)
            run("keys", "revoke", key_id)
            # the API process remembers a key for api_key_cache_s; past that it is refused
            time.sleep(0.6)
            assert client.get("/v1/jobs", headers=bearer(key)).status_code == 401
