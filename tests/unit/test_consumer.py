"""The worker's consumer passes short reconnect intervals to kombu."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from core.settings import get_settings
from workers.app import celery_app
from workers.consumer import PromptReconnectConsumer


class RecordingConnection:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def ensure_connection(self, *args: Any, **kwargs: Any) -> RecordingConnection:
        self.calls.append(kwargs)
        return self


def test_workers_use_the_prompt_reconnect_consumer() -> None:
    assert celery_app.conf.worker_consumer == "workers.consumer:PromptReconnectConsumer"


def test_reconnect_waits_never_exceed_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELYARD_BROKER_RECONNECT_MAX_S", "1.5")
    get_settings.cache_clear()
    try:
        consumer: Any = object.__new__(PromptReconnectConsumer)
        consumer.app = SimpleNamespace(
            conf=SimpleNamespace(
                broker_connection_retry_on_startup=True,
                broker_connection_retry=True,
                broker_connection_max_retries=None,
            )
        )
        consumer.first_connection_attempt = False
        consumer.broker_connection_retry_attempt = 0
        conn = RecordingConnection()
        assert consumer.ensure_connected(conn) is conn
    finally:
        get_settings.cache_clear()
    assert conn.calls == [
        {
            "interval_start": 0.375,
            "interval_step": 0.375,
            "interval_max": 1.5,
            "callback": conn.calls[0]["callback"],
        }
    ]
