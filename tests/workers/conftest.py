from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL
from tests.support.memory_io import MemoryTrainingIO
from workers.model_refs import ResolvedModel


@pytest.fixture
def io(tiny_model_dir: Path, tmp_path: Path) -> MemoryTrainingIO:
    """An in-memory TrainingIO whose attempt directory is `tmp_path/work`, resolving
    `tiny-gpt2` to the tests' tiny model."""
    memory = MemoryTrainingIO(work_dir=tmp_path / "work")
    memory.work_dir.mkdir()
    memory.models[TINY_MODEL] = ResolvedModel(ref=str(tiny_model_dir))
    return memory
