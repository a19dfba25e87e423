from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.auth import RateLimiter
from api.main import create_app
from core.settings import Settings
from tests.support.auth import TEST_RPM, bearer, make_key
from tests.support.services import redis_db_index

MAX_BODY = 64 * 1024
SMALL_UPLOAD = 128 * 1024


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with redis_db_index() as broker_url:
        yield Settings(
            data_dir=Path(tmp_path_factory.mktemp("data")),
            database_url=database_url,
            broker_url=broker_url,
            max_body_bytes=MAX_BODY,
            requests_per_minute=int(TEST_RPM),
            metrics_cache_s=0,  # tests scrape right after each change
            metrics_history_refresh_s=0,
            # route tests name models no worker will load; the submit-time check of
            # model sources has tests of its own (test_model_sources.py)
            hub_downloads=True,
            hub_allowed_models=["*"],
        )


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    """The API as an admin key of the default tenant."""
    with TestClient(create_app(settings)) as c:
        c.headers.update(bearer(make_key(settings.database_url)))
        yield c


@pytest.fixture(scope="module")
def small_upload_settings(settings: Settings) -> Settings:
    """The module's settings with a dataset upload limit of SMALL_UPLOAD (above MAX_BODY)."""
    return settings.model_copy(update={"max_upload_bytes": SMALL_UPLOAD})


@pytest.fixture(scope="module")
def small_upload_client(small_upload_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(small_upload_settings)) as c:
        c.headers.update(bearer(make_key(small_upload_settings.database_url)))
        yield c


@pytest.fixture
def limiter() -> Iterator[RateLimiter]:
    """A rate limiter on a Redis db index of its own."""
    with redis_db_index() as url:
        rate = RateLimiter(url)
        yield rate
        rate.close()
