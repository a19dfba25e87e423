from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import install_tiny_model
from tests.support.browser import chromium
from tests.support.harness import Stack
from tests.support.services import RedisServer


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server per module: these tests FLUSHALL it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(
    database_url: str,
    broker: RedisServer,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """API + beat + one worker, real processes, on this module's database and Redis."""
    s = Stack(tmp_path_factory.mktemp("stack"), database_url, broker.url)
    install_tiny_model(tiny_model_dir, s.workdir / "data")
    with s.running():
        yield s


@pytest.fixture
def one_worker(stack: Stack) -> Stack:
    """Exactly one live worker at the start of the test."""
    for proc in list(stack.workers):
        if not proc.alive():
            stack.workers.remove(proc)
    while len(stack.workers) > 1:
        stack.workers.pop().stop()
    if not stack.workers:
        stack.start_worker()
    return stack


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium for dashboard tests; skips (fails under CI) without it."""
    with chromium(tmp_path) as driver:
        yield driver
