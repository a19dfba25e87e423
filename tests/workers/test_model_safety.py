"""Model directories that would run code when loaded are refused by the API and by the
workers: pickle weights are never unpickled, custom code (auto_map, *.py) never imported."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.enums import FailureType, FineTuneTask
from core.errors import PermanentJobError
from core.settings import Settings
from tests.support.auth import bearer, make_key
from tests.support.services import redis_db_index
from workers.generation.cache import _load
from workers.model_refs import resolve_local
from workers.training.models import load_base_model


class _Touch:
    """Unpickling (or importing code that builds) this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data" / "models"
    directory.mkdir(parents=True)
    return directory


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


@pytest.fixture
def pickle_model(tiny_model_dir: Path, models_dir: Path, marker: Path) -> Path:
    """A GPT-2 whose only weights are a malicious pytorch_model.bin."""
    target = models_dir / "pickled"
    shutil.copytree(tiny_model_dir, target)
    for weights in target.glob("*.safetensors"):
        weights.unlink()
    (target / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    return target


@pytest.fixture
def remote_code_model(tiny_model_dir: Path, models_dir: Path, marker: Path) -> Path:
    """A GPT-2 whose config maps AutoModel to code next to it that touches the marker."""
    target = models_dir / "remote-code"
    shutil.copytree(tiny_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (target / "config.json").write_text(json.dumps(config))
    (target / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass EvilModel: pass\n"
    )
    return target


def test_pickle_weights_are_never_loaded(pickle_model: Path, marker: Path) -> None:
    with pytest.raises(PermanentJobError) as generate:
        _load(str(pickle_model), "cpu")
    assert generate.value.failure is FailureType.MODEL_NOT_FOUND
    with pytest.raises(PermanentJobError, match="no safetensors"):
        load_base_model(FineTuneTask.CAUSAL_LM, str(pickle_model), [])
    assert not marker.exists()


def test_custom_code_is_refused_before_loading(remote_code_model: Path, marker: Path) -> None:
    with pytest.raises(PermanentJobError, match="auto_map") as refused:
        resolve_local("remote-code", remote_code_model.parent)
    assert refused.value.failure is FailureType.INVALID_SPEC
    (remote_code_model / "config.json").write_text(
        json.dumps(
            {
                k: v
                for k, v in json.loads((remote_code_model / "config.json").read_text()).items()
                if k != "auto_map"
            }
        )
    )
    with pytest.raises(PermanentJobError, match="Python code"):
        resolve_local("remote-code", remote_code_model.parent)
    assert not marker.exists()


def test_the_api_refuses_both_with_422(
    pickle_model: Path, remote_code_model: Path, marker: Path, tmp_path: Path
) -> None:
    with (
        redis_db_index() as broker_url,
        TestClient(
            create_app(
                Settings(
                    data_dir=tmp_path / "data",
                    database_url=f"sqlite:///{tmp_path / 'm.db'}",
                    broker_url=broker_url,
                )
            )
        ) as client,
    ):
        client.headers.update(bearer(make_key(f"sqlite:///{tmp_path / 'm.db'}")))
        for name, expected in (("pickled", "no safetensors"), ("remote-code", "auto_map")):
            resp = client.post(
                "/v1/jobs",
                json={"kind": "generate", "spec": {"model": name, "prompts": ["hi"]}},
            )
            assert resp.status_code == 422, resp.text
            assert expected in resp.json()["error"]["message"]
            assert resp.json()["error"]["param"] == "spec.model"
        assert client.get("/v1/jobs").json()["data"] == []
    assert not marker.exists()


def test_the_api_sees_a_directory_change_after_it_accepted_the_directory(
    tiny_model_dir: Path, models_dir: Path, tmp_path: Path
) -> None:
    """The API reads a model directory once while it is unchanged (a burst of requests on
    one model); code put next to the weights, or an auto_map written into its config in
    place, is refused from the next request on."""
    target = models_dir / "changing"
    shutil.copytree(tiny_model_dir, target)
    db = f"sqlite:///{tmp_path / 'm.db'}"
    settings = Settings(data_dir=tmp_path / "data", database_url=db)
    job = {"kind": "generate", "spec": {"model": "changing", "prompts": ["hi"]}}
    with redis_db_index() as broker_url:
        app = create_app(settings.model_copy(update={"broker_url": broker_url}))
        with TestClient(app) as client:
            client.headers.update(bearer(make_key(db)))
            assert client.post("/v1/jobs", json=job).status_code == 202
            (target / "modeling_extra.py").write_text("class Extra: pass\n")
            resp = client.post("/v1/jobs", json=job)
            assert resp.status_code == 422 and "modeling_extra.py" in resp.text, resp.text
            (target / "modeling_extra.py").unlink()
            assert client.post("/v1/jobs", json=job).status_code == 202
            config = json.loads((target / "config.json").read_text())
            config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
            with (target / "config.json").open("r+") as f:  # in place: the same file
                f.write(json.dumps(config))
                f.truncate()
            resp = client.post("/v1/jobs", json=job)
            assert resp.status_code == 422 and "auto_map" in resp.text, resp.text


def test_symlinks_out_of_the_data_dir_are_not_followed(
    tiny_model_dir: Path, models_dir: Path, tmp_path: Path
) -> None:
    from workers.model_refs import inside

    outside = tmp_path / "outside-model"
    shutil.copytree(tiny_model_dir, outside)
    (models_dir / "escape").symlink_to(outside, target_is_directory=True)
    assert resolve_local("escape", models_dir) == "escape"  # not the directory it points to
    with pytest.raises(PermanentJobError, match="escapes the data dir"):
        inside(models_dir.parent, "models/escape")
    with pytest.raises(PermanentJobError, match="escapes the data dir"):
        inside(models_dir.parent, "../outside-model")


def test_a_path_into_tenant_files_is_refused_by_the_api_and_the_workers(
    tiny_model_dir: Path, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another tenant's registered model is reached by its registry name within that tenant
    only: its directory under tenants/ given as a path (from the working directory, or
    through models/..) is refused; a base under models/ and a directory outside the data
    dir load. (Names starting with / or . are refused by the spec's pattern already.)"""
    monkeypatch.chdir(tmp_path)
    data = models_dir.parent
    theirs = data / "tenants" / "other" / "jobs" / "job_1" / "attempts" / "1" / "model"
    shutil.copytree(tiny_model_dir, theirs)
    shutil.copytree(tiny_model_dir, models_dir / "base")
    shutil.copytree(tiny_model_dir, tmp_path / "operator-models" / "gpt")
    outside = "operator-models/gpt"
    url = f"sqlite:///{tmp_path / 'm.db'}"
    settings = Settings(data_dir=data, database_url=url)
    sneaky = (
        str(theirs.relative_to(tmp_path)),  # data/tenants/...
        "base/../../tenants/other/jobs/job_1/attempts/1/model",
    )
    for ref in sneaky:
        with pytest.raises(PermanentJobError, match="a path into the data dir") as exc:
            resolve_local(ref, models_dir, settings=settings)
        assert exc.value.failure is FailureType.MODEL_NOT_FOUND
    assert resolve_local("base", models_dir, settings=settings) == str(models_dir / "base")
    assert resolve_local(outside, models_dir, settings=settings) == outside
    with (
        redis_db_index() as broker_url,
        TestClient(
            create_app(Settings(data_dir=data, database_url=url, broker_url=broker_url))
        ) as client,
    ):
        client.headers.update(bearer(make_key(url)))
        for ref in sneaky:
            resp = client.post(
                "/v1/jobs", json={"kind": "generate", "spec": {"model": ref, "prompts": ["hi"]}}
            )
            assert resp.status_code == 422, resp.text
            assert resp.json()["error"]["param"] == "spec.model"
            if ".." not in ref:  # a '..' segment is refused by the spec's own check first
                assert "a path into the data dir" in resp.json()["error"]["message"]
        assert client.get("/v1/jobs").json()["data"] == []
        for ref in ("base", outside):
            resp = client.post(
                "/v1/jobs", json={"kind": "generate", "spec": {"model": ref, "prompts": ["hi"]}}
            )
            assert resp.status_code == 202, resp.text


def test_a_hub_id_is_no_path_even_when_run_from_inside_the_data_dir(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.model_sources import into_tenant_files

    settings = Settings(data_dir=models_dir.parent)
    monkeypatch.chdir(models_dir.parent)
    assert not into_tenant_files(settings, "org/some-model")  # nothing there: a hub id
    (models_dir.parent / "org" / "some-model").mkdir(parents=True)
    assert into_tenant_files(settings, "org/some-model")  # now a directory of the data dir
