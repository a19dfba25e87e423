"""`GET /metrics` in the Prometheus text format. Values are read when scraped: job
history lives in the database, so they survive restarts and agree across API processes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from core.enums import QUEUE_FOR_KIND, JobKind
from core.settings import Settings
from core.worker_reports import read_reports
from db import stats
from db.base import utcnow
from db.models import Job
from db.session import session_scope

logger = logging.getLogger(__name__)

WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
RUN_BUCKETS = (0.1, 1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 48 * 3600)


def _histogram(name: str, doc: str, found: dict[str, stats.Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["kind"])
    for kind, h in sorted(found.items()):
        buckets = [(str(float(le)), float(n)) for le, n in h.buckets]
        buckets.append(("+Inf", float(h.count)))
        family.add_metric([kind], buckets, h.total)
    return family


class ModelyardCollector(Collector):
    """Counts by status, queue depths, throughput and workers are read on every
    collection; the figures that scan the whole history (wait and run histograms, tokens,
    failed webhook attempts) at most every `metrics_history_refresh_s`, since they move slowly
    and cost most with a long history (bench/metrics_scrape.py)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._history_made = float("-inf")
        self._history_cached: list[Metric] = []

    def _history(self, session: Session) -> list[Metric]:
        with self._lock:
            if time.monotonic() - self._history_made < self._settings.metrics_history_refresh_s:
                return self._history_cached
            families: list[Metric] = [
                _histogram(
                    "modelyard_job_wait_seconds",
                    "Time from queued to started (the last attempt's).",
                    stats.duration_histograms(session, Job.queued_at, Job.started_at, WAIT_BUCKETS),
                ),
                _histogram(
                    "modelyard_job_run_seconds",
                    "Time from started to finished.",
                    stats.duration_histograms(
                        session, Job.started_at, Job.finished_at, RUN_BUCKETS
                    ),
                ),
            ]
            tokens = CounterMetricFamily(
                "modelyard_generated_tokens", "Tokens generated in stored outputs."
            )
            tokens.add_metric([], stats.generated_tokens(session))
            failures = CounterMetricFamily(
                "modelyard_webhook_failed_attempts",
                "Webhook delivery attempts without a 2xx answer.",
            )
            failures.add_metric([], stats.failed_attempts(session))
            families += [tokens, failures]
            self._history_cached = families
            self._history_made = time.monotonic()
            return families

    def collect(self) -> Iterator[Metric]:
        with session_scope(self._settings.database_url, readonly=True) as session:
            jobs = GaugeMetricFamily(
                "modelyard_jobs", "Jobs by kind and status.", labels=["kind", "status"]
            )
            for kind, status, n in stats.job_counts(session):
                jobs.add_metric([kind, status], n)
            yield jobs

            depth = GaugeMetricFamily(
                "modelyard_queue_depth", "Queued jobs per queue.", labels=["queue"]
            )
            oldest = GaugeMetricFamily(
                "modelyard_queue_oldest_age_seconds",
                "How long the oldest queued job of each queue has waited.",
                labels=["queue"],
            )
            per_queue: dict[str, tuple[int, float]] = {q: (0, 0.0) for q in QUEUE_FOR_KIND.values()}
            now = utcnow()
            for kind, n, first in stats.queued_by_kind(session):
                queue = QUEUE_FOR_KIND[JobKind(kind)]
                age = (now - first).total_seconds() if first is not None else 0.0
                count, worst = per_queue[queue]
                per_queue[queue] = (count + n, max(worst, age))
            for queue, (count, worst) in sorted(per_queue.items()):
                depth.add_metric([queue], count)
                oldest.add_metric([queue], worst)
            yield depth
            yield oldest

            yield from self._history(session)
            yield self._throughput(stats.training_throughput(session))
            deliveries = GaugeMetricFamily(
                "modelyard_webhook_deliveries", "Webhook deliveries by status.", labels=["status"]
            )
            for status, n in stats.delivery_counts(session):
                deliveries.add_metric([status], n)
            yield deliveries
        yield from self._workers()

    def _throughput(self, found: list[tuple[str, str, float]]) -> Metric:
        """Per job (with its id and tenant) only when the operator asked for such labels:
        they name tenants and grow one series per fine-tune."""
        doc = "Training throughput of running fine-tunes (since their attempt started)."
        if not self._settings.metrics_job_labels:
            total = GaugeMetricFamily("modelyard_training_samples_per_second", doc)
            total.add_metric([], sum(rate for _, _, rate in found))
            return total
        rates = GaugeMetricFamily(
            "modelyard_training_samples_per_second", doc, labels=["job_id", "tenant"]
        )
        for job_id, tenant_id, rate in found:
            rates.add_metric([job_id, tenant_id], rate)
        return rates

    def _workers(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "modelyard_worker_up", "Workers reporting a heartbeat.", labels=["worker", "queues"]
        )
        busy = GaugeMetricFamily(
            "modelyard_worker_busy", "1 while the worker runs a job.", labels=["worker"]
        )
        age = GaugeMetricFamily(
            "modelyard_worker_heartbeat_age_seconds",
            "Seconds since the worker's last heartbeat.",
            labels=["worker"],
        )
        client: redis.Redis = redis.Redis.from_url(
            self._settings.broker_url, socket_timeout=2, socket_connect_timeout=2
        )
        try:
            reports = read_reports(client)
        except redis.RedisError as exc:
            logger.warning("metrics: broker unreachable (%s)", type(exc).__name__)
            reports = []
        finally:
            client.close()
        now = time.time()
        for r in reports:
            up.add_metric([r.hostname, ",".join(r.queues)], 1)
            busy.add_metric([r.hostname], 1 if r.busy else 0)
            age.add_metric([r.hostname], max(now - r.reported, 0.0))
        yield up
        yield busy
        yield age
