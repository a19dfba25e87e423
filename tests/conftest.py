from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import postgres_database

# No model or dataset is ever downloaded in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process (this one and every worker and training process the tests
# start, which inherit it): the tests' models are tiny, and on 2 cores shared by two test
# processes and their workers, two intra-op threads made a tiny fine-tune 5-10x slower
# (bench/README.md, row T). Production keeps torch's default.
os.environ.setdefault("OMP_NUM_THREADS", "1")

BACKENDS = ["sqlite", "postgresql"]
TINY_MODEL = "tiny-gpt2"
TINY_CHAT_MODEL = "tiny-gpt2-chat"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_model import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / TINY_MODEL)


def install_tiny_model(tiny_model_dir: Path, data_dir: Path) -> None:
    """Copy the tiny model where `model: tiny-gpt2` resolves for a stack using `data_dir`."""
    shutil.copytree(tiny_model_dir, data_dir / "models" / TINY_MODEL, dirs_exist_ok=True)


def install_tiny_chat_model(tiny_model_dir: Path, data_dir: Path) -> None:
    """The tiny model with a chat template, where `model: tiny-gpt2-chat` resolves."""
    from tests.support.tiny_model import with_chat_template

    with_chat_template(tiny_model_dir, data_dir / "models" / TINY_CHAT_MODEL)


# Longest first: with `-n 2 --dist loadscope` each module goes whole to whichever process
# is free, in collection order, so the fault and end-to-end modules (tens of seconds to
# minutes each) start first, then the worker modules that train tiny models (the runner's,
# tracking's with its MLflow server: up to a minute each), and the short ones fill in around
# them, instead of one long module running alone at the end.
_LONG_FIRST = ("tests/faults/", "tests/e2e/", "tests/workers/")


def _length_rank(item: pytest.Item) -> int:
    path = item.nodeid
    return next((i for i, prefix in enumerate(_LONG_FIRST) if path.startswith(prefix)), 99)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_length_rank)  # stable: each module's own order stays


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests that use a database run on every backend, or on the ones their module lists
    in `BACKENDS` (with the reason next to it), or that their own parametrize names."""
    marked = any(
        "database_url" in str(m.args[0]) for m in metafunc.definition.iter_markers("parametrize")
    )
    if "database_url" in metafunc.fixturenames and not marked:
        backends = getattr(metafunc.module, "BACKENDS", BACKENDS)
        metafunc.parametrize("database_url", backends, indirect=True, scope="module")


@pytest.fixture(scope="module")
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh empty database per test module and backend."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "modelyard.db"
        yield f"sqlite:///{path}"
    else:
        with postgres_database() as url:
            yield url
