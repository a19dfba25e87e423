"""core/storage.py against a real S3 server (moto over HTTP, through s3fs): what one host
publishes, a host with an empty data dir fetches byte for byte; removal deletes it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from core.storage import ArtifactStore, artifact_store
from tests.support.s3 import S3Store, moto_s3_store


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Store]:
    with moto_s3_store() as store:
        yield store


def _tree(root: Path) -> Path:
    """A model-like tree: nested directories, binary and empty files, a multi-MiB file."""
    model = root / "tenants" / "t1" / "jobs" / "job_1" / "model"
    (model / "sub" / "deeper").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    (model / "sub" / "weights.safetensors").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (model / "sub" / "deeper" / "empty.txt").write_bytes(b"")
    return model


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_tree_and_a_file_reach_an_empty_data_dir_byte_for_byte(
    s3: S3Store, tmp_path: Path
) -> None:
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    writer = ArtifactStore(host_a, s3.url, s3.options)
    reader = ArtifactStore(host_b, s3.url, s3.options)
    model = _tree(host_a)
    dataset = host_a / "tenants" / "t1" / "datasets" / "ds_1.jsonl"
    dataset.parent.mkdir(parents=True)
    dataset.write_bytes(b'{"text": "caf\xc3\xa9"}\n' * 1000)
    writer.publish(model)
    writer.publish(dataset)

    keys = s3.filesystem().find(s3.key("tenants/t1"))
    assert sorted(k.removeprefix(s3.key("")) for k in keys) == [
        "tenants/t1/datasets/ds_1.jsonl",
        "tenants/t1/jobs/job_1/model/config.json",
        "tenants/t1/jobs/job_1/model/sub/deeper/empty.txt",
        "tenants/t1/jobs/job_1/model/sub/weights.safetensors",
    ]
    assert not host_b.exists()
    fetched = reader.fetch(host_b / model.relative_to(host_a))
    assert fetched.is_dir() and _files(fetched) == _files(model)
    assert not [p for p in fetched.parent.iterdir() if p.name.endswith(".partial")]
    fetched_dataset = reader.fetch(host_b / dataset.relative_to(host_a))
    assert fetched_dataset.read_bytes() == dataset.read_bytes()

    missing = host_b / "tenants" / "t1" / "jobs" / "job_2" / "model"
    assert reader.fetch(missing) == missing and not missing.exists()


def test_publishing_again_replaces_the_shared_copy(s3: S3Store, tmp_path: Path) -> None:
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    writer = ArtifactStore(host_a, s3.url, s3.options)
    marker = host_a / "tenants" / "t1" / "jobs" / "job_3" / "step.txt"
    marker.parent.mkdir(parents=True)
    marker.write_text("first")
    writer.publish(marker)
    marker.write_text("second, longer")
    writer.publish(marker)
    fetched = ArtifactStore(host_b, s3.url, s3.options).fetch(host_b / marker.relative_to(host_a))
    assert fetched.read_text() == "second, longer"


def test_removal_deletes_a_tree_and_a_file_from_the_store(s3: S3Store, tmp_path: Path) -> None:
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    writer = ArtifactStore(host_a, s3.url, s3.options)
    model = _tree(host_a)
    (host_a / "tenants" / "t1" / "jobs" / "job_1" / "kept.txt").write_text("kept")
    writer.publish(model)
    writer.publish(host_a / "tenants" / "t1" / "jobs" / "job_1" / "kept.txt")
    lone = model / "config.json"

    writer.remove(lone)
    fs = s3.filesystem()
    assert not fs.exists(s3.key("tenants/t1/jobs/job_1/model/config.json"))
    assert fs.exists(s3.key("tenants/t1/jobs/job_1/model/sub/weights.safetensors"))

    writer.remove(model)
    fs = s3.filesystem()
    assert fs.find(s3.key("tenants/t1/jobs/job_1/model")) == []
    assert fs.cat(s3.key("tenants/t1/jobs/job_1/kept.txt")) == b"kept"
    writer.remove(model)  # already gone: nothing to do, no error
    gone = host_b / model.relative_to(host_a)
    assert ArtifactStore(host_b, s3.url, s3.options).fetch(gone) == gone and not gone.exists()


def test_settings_from_the_environment_reach_the_server(
    s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MODELYARD_STORAGE_URL and MODELYARD_STORAGE_OPTIONS (JSON) as an operator sets them."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MODELYARD_DATA_DIR", str(tmp_path / "a"))
    settings = Settings()
    assert settings.storage_options == s3.options
    dataset = tmp_path / "a" / "tenants" / "t9" / "datasets" / "ds_9.jsonl"
    dataset.parent.mkdir(parents=True)
    dataset.write_bytes(b'{"text": "x"}\n')
    artifact_store(settings).publish(dataset)
    assert s3.filesystem().cat(s3.key("tenants/t9/datasets/ds_9.jsonl")) == b'{"text": "x"}\n'
