"""The worker's broker consumer: Celery's, reconnecting promptly after an outage."""

from __future__ import annotations

import functools
from typing import Any

from celery.worker.consumer import Consumer

from core.settings import get_settings


class PromptReconnectConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer retries a lost broker connection after 2, 4, 6, ... s, up to
    30 s apart, so a worker came back up to 30 s after the broker did. Here the waits
    start at a quarter of `broker_reconnect_max_s` and never exceed it."""

    def ensure_connected(self, conn: Any) -> Any:
        longest = get_settings().broker_reconnect_max_s
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=longest / 4,
            interval_step=longest / 4,
            interval_max=longest,
        )
        return super().ensure_connected(conn)
