"""One fault lab for the whole directory: a private PostgreSQL cluster (stopped and started
by the database scenario without touching the shared server), a private redis-server
(restarted and cut off by the broker scenarios), and API, beat and worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.scenarios import Lab, lab_stack
from tests.support.services import PostgresCluster, RedisServer


@pytest.fixture(scope="session")
def fault_pg() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def fault_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("fault-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def lab(
    fault_pg: PostgresCluster,
    fault_broker: RedisServer,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Lab]:
    with lab_stack(
        tmp_path_factory.mktemp("faults"),
        tiny_model_dir,
        pg=fault_pg,
        broker=fault_broker,
        name="modelyard_faults",
    ) as fault_lab:
        yield fault_lab
