from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from workers.executor import retry_delay


def test_database_defaults_to_sqlite_in_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'modelyard.db'}"


def test_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELYARD_LEASE_TTL_S", "7.5")
    monkeypatch.setenv("MODELYARD_BROKER_URL", "redis://example:1/2")
    settings = Settings()
    assert settings.lease_ttl_s == 7.5
    assert settings.broker_url == "redis://example:1/2"


def test_retry_delay_doubles_and_caps() -> None:
    settings = Settings(retry_backoff_s=2, retry_backoff_max_s=10)
    assert [retry_delay(settings, n) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]
