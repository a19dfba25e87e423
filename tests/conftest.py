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


# Longest first. `make test` runs `-n 2 --dist loadscope --no-loadscope-reorder`: each
# module goes whole to whichever process is free, in collection order (without the flag,
# xdist orders modules by their number of tests, which ran the few-test, minute-long fault
# modules last and let one of them finish alone). The modules below took 45 s or more each
# in a full run (2026-12-06, both backends, under the suite's own load), longest first; then
# the rest of the fault and end-to-end modules, the worker modules that train tiny models,
# and the short ones, which fill in around them.
_LONGEST = (
    "tests/e2e/test_finetune.py",
    "tests/e2e/test_spine.py",
    "tests/faults/test_broker_faults.py",
    "tests/e2e/test_openai_serving.py",
    "tests/faults/test_job_faults.py",
    "tests/e2e/test_training_procs.py",
    "tests/faults/test_worker_faults.py",
    "tests/e2e/test_openai_embeddings.py",
    "tests/faults/test_outage_faults.py",
    "tests/e2e/test_batch_files.py",
    "tests/faults/test_host_faults.py",
    "tests/e2e/test_schema_fuzz.py",
    "tests/e2e/test_generation_batching.py",
    "tests/faults/test_lease_faults.py",
    "tests/e2e/test_hosts.py",
    "tests/e2e/test_shared_storage.py",
    "tests/workers/test_tracking.py",
    "tests/faults/test_training_faults.py",
    "tests/e2e/test_tenancy_e2e.py",
    "tests/e2e/test_webhooks.py",
    "tests/faults/test_database_faults.py",
    "tests/faults/test_message_faults.py",
)
_LONG_FIRST = ("tests/faults/", "tests/e2e/", "tests/workers/")


def _length_rank(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    if path in _LONGEST:
        return _LONGEST.index(path)
    prefix = next((i for i, p in enumerate(_LONG_FIRST) if path.startswith(p)), len(_LONG_FIRST))
    return len(_LONGEST) + prefix


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
