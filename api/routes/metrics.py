"""Prometheus scrape endpoint, for keys with the `metrics` scope of the operator's tenant
(the figures cover every tenant). Answers come from a copy at most `metrics_cache_s` old,
made by one scrape at a time, so scrapers cannot load the database."""

from __future__ import annotations

import threading
import time

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from api.deps import MetricsReader, SettingsDep
from core.errors import PermissionDeniedError
from db.models import DEFAULT_TENANT

router = APIRouter(tags=["operations"])


class ScrapeCache:
    """The last exposition and when it was made; one scrape renews it at a time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._body = b""
        self._made = float("-inf")

    def get(self, max_age_s: float) -> bytes:
        with self._lock:
            if time.monotonic() - self._made >= max_age_s:
                self._body = generate_latest(self._registry)
                self._made = time.monotonic()
            return self._body


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, who: MetricsReader, settings: SettingsDep) -> Response:
    """Jobs by kind/status, queue depth and oldest wait per queue, wait and run time
    histograms, generated tokens, webhook deliveries, worker heartbeats."""
    if who.tenant_id != DEFAULT_TENANT:
        raise PermissionDeniedError("/metrics covers every tenant: it needs a key of the operator")
    cache: ScrapeCache = request.app.state.metrics_cache
    return Response(cache.get(settings.metrics_cache_s), media_type=CONTENT_TYPE_LATEST)
