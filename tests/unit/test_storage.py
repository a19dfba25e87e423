"""core/storage.py: artifacts published by one host are fetched whole by another."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import StorageError
from core.storage import ArtifactStore


def _model_dir(root: Path) -> Path:
    model = root / "tenants" / "t1" / "jobs" / "job_1" / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    (model / "sub" / "weights.safetensors").write_bytes(b"\x00\x01" * 100)
    return model


def test_a_directory_and_a_file_travel_between_two_data_dirs(tmp_path: Path) -> None:
    shared = f"file://{tmp_path / 'shared'}"
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    a, b = ArtifactStore(host_a, shared, {}), ArtifactStore(host_b, shared, {})
    model = _model_dir(host_a)
    dataset = host_a / "tenants" / "t1" / "datasets" / "ds_1" / "data.jsonl"
    dataset.parent.mkdir(parents=True)
    dataset.write_text('{"text": "hi"}\n')
    a.publish(model)
    a.publish(dataset.parent)

    fetched = b.fetch(host_b / model.relative_to(host_a))
    assert (fetched / "config.json").read_text() == '{"model_type": "gpt2"}'
    assert (fetched / "sub" / "weights.safetensors").read_bytes() == b"\x00\x01" * 100
    assert not [p for p in fetched.parent.iterdir() if p.name.endswith(".partial")]
    local_dataset = b.fetch(host_b / dataset.relative_to(host_a))
    assert local_dataset.read_text() == '{"text": "hi"}\n'

    missing = host_b / "tenants" / "t1" / "jobs" / "job_2" / "model"
    assert b.fetch(missing) == missing and not missing.exists()  # caller reports it
    b.remove(host_b / model.relative_to(host_a))
    assert not (tmp_path / "shared" / model.relative_to(host_a)).exists()


def test_without_a_url_nothing_is_copied(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "a", "", {})
    model = _model_dir(tmp_path / "a")
    store.publish(model)
    store.remove(model)
    assert model.is_dir() and not store.enabled
    elsewhere = tmp_path / "a" / "models" / "absent"
    assert store.fetch(elsewhere) == elsewhere and not elsewhere.exists()


def test_paths_outside_the_data_dir_are_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "a", f"file://{tmp_path / 'shared'}", {})
    (tmp_path / "a").mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    for path in (outside, tmp_path / "a" / ".." / "secret.txt", tmp_path / "a"):
        with pytest.raises(StorageError):
            store.publish(path)
    assert not (tmp_path / "shared").exists()
