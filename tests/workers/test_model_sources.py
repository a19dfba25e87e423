"""Model sources (core/model_sources.py): hub downloads off unless the deployment turns
them on for allow-listed repositories; a model that is neither installed nor allowed is
refused at submit (422) and, in the worker, at once with a typed error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.enums import FailureType
from core.errors import PermanentJobError
from core.model_sources import hub_allowed
from core.settings import Settings
from tests.support.auth import bearer, make_key
from tests.support.services import redis_db_index
from workers.model_refs import resolve_model


def test_hub_allow_list() -> None:
    off = Settings(hub_allowed_models=["org/model"])
    assert not hub_allowed(off, "org/model")  # downloads off: nothing is allowed
    on = Settings(hub_downloads=True, hub_allowed_models=["org/model", "team/*"])
    assert hub_allowed(on, "org/model") and hub_allowed(on, "team/anything")
    assert not hub_allowed(on, "org/other") and not hub_allowed(on, "teamx/model")
    assert hub_allowed(Settings(hub_downloads=True, hub_allowed_models=["*"]), "any/model")


def test_the_worker_refuses_an_uninstalled_model_at_once(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(PermanentJobError) as info:
        resolve_model(settings, "someone/not-installed")
    assert info.value.failure is FailureType.MODEL_NOT_FOUND
    assert "'someone/not-installed'" in info.value.message
    allowed = Settings(data_dir=tmp_path, hub_downloads=True, hub_allowed_models=["someone/*"])
    assert resolve_model(allowed, "someone/not-installed").ref == "someone/not-installed"


def test_submit_refuses_an_uninstalled_model_unless_allowed(
    database_url: str, tmp_path: Path
) -> None:
    body = {"kind": "generate", "spec": {"model": "someone/not-installed", "prompts": ["hi"]}}
    with redis_db_index() as broker:
        for settings, code in [
            (Settings(data_dir=tmp_path, database_url=database_url, broker_url=broker), 422),
            (
                Settings(
                    data_dir=tmp_path,
                    database_url=database_url,
                    broker_url=broker,
                    hub_downloads=True,
                    hub_allowed_models=["someone/not-installed"],
                ),
                202,
            ),
        ]:
            with TestClient(create_app(settings)) as c:
                c.headers.update(bearer(make_key(database_url)))
                resp = c.post("/v1/jobs", json=body)
            assert resp.status_code == code, resp.text
            if code == 422:
                error = resp.json()["error"]
                assert error["type"] == "model_not_installed"
                assert "'someone/not-installed'" in error["message"]
