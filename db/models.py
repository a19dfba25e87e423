from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base, UTCDateTime, utcnow

DEFAULT_TENANT = "default"


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


def new_tenant_id() -> str:
    return f"ten_{uuid.uuid4().hex[:16]}"


def new_key_id() -> str:
    return f"key_{uuid.uuid4().hex}"


class Tenant(Base):
    """An organisation whose jobs, datasets and models no other tenant can see.

    The quota columns override the settings' defaults when set."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_tenant_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_dataset_bytes: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    """An API key: only its SHA-256 and a short visible prefix are stored."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_key_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    prefix: Mapped[str] = mapped_column(String(16))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditEntry(Base):
    """Who (key) did what (create/cancel/delete/revoke) to which object, and when."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    tenant_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(32))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(255))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_status_available_at", "status", "available_at"),
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        Index("ix_jobs_status_kind_model", "status", "kind", "model"),
        Index("ix_jobs_status_expires_at", "status", "expires_at"),
        Index("ix_jobs_tenant_id_status", "tenant_id", "status"),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_id_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_job_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The model a generation job runs on: workers batch ready jobs that share it.
    model: Mapped[str | None] = mapped_column(String(255))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # Unique per tenant (uq_jobs_tenant_id_idempotency_key).
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    # Attempts that ended without counting toward max_attempts: handed back by a worker
    # shutting down, or paused. Attempts that count: attempts - handbacks.
    handbacks: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # A running fine-tune asked to checkpoint and stop as `paused` (until resumed).
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    progress_detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Deadlines: a queued job past `expires_at` never starts; a running one past
    # `max_runtime_s` of run time is stopped.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    max_runtime_s: Mapped[float | None] = mapped_column(Float)
    # Webhook subscription: the URL and the events, as ",started,completed," so one
    # LIKE finds subscribers in the INSERT ... SELECT that queues a delivery.
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[str | None] = mapped_column(String(64))


# The tables themselves, for statements built once (no ORM on the jobs' hot paths).
TENANTS = cast(Table, Tenant.__table__)
JOBS = cast(Table, Job.__table__)


class JobEvent(Base):
    """Append-only record of what happened to a job."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Output(Base):
    """One generated sequence for one prompt of a job."""

    __tablename__ = "outputs"
    __table_args__ = (
        UniqueConstraint("job_id", "prompt_index", "sequence_index", name="uq_outputs_position"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    prompt_index: Mapped[int] = mapped_column(Integer)
    sequence_index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def new_dataset_id() -> str:
    return f"ds_{uuid.uuid4().hex}"


class Dataset(Base):
    """An uploaded, validated training/evaluation file stored under the data dir."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_created_at_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_dataset_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))  # jsonl | csv | conll
    schema: Mapped[str] = mapped_column(String(32))  # text | prompt_completion | chat | ...
    rows: Mapped[int] = mapped_column(Integer)
    labels: Mapped[list[str]] = mapped_column(JSON, default=list)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # relative to the data dir
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Metric(Base):
    """One scalar per step: train loss, learning rate, eval metrics."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_job_id_name_step", "job_id", "name", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Checkpoint(Base):
    """A resumable training state (safetensors weights + optimizer/scheduler) on disk."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_id_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # relative to the data dir
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


MODEL_NAME_LENGTH = 255  # a registered model's name, at most


class RegisteredModel(Base):
    """A fine-tuned model (`ft:<base>:<suffix>:<job id>`) usable by later jobs."""

    __tablename__ = "models"
    __table_args__ = (Index("ix_models_created_at_name", "created_at", "name"),)

    name: Mapped[str] = mapped_column(String(MODEL_NAME_LENGTH), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    base_model: Mapped[str] = mapped_column(String(255))
    task: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(16))  # full | lora | adalora
    adapter: Mapped[bool] = mapped_column(Boolean, default=False)  # path holds a peft adapter
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    path: Mapped[str] = mapped_column(Text)  # relative to the data dir
    labels: Mapped[list[str]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def new_delivery_id() -> str:
    return f"whd_{uuid.uuid4().hex}"


class WebhookDelivery(Base):
    """One webhook message for one job event, sent until a 2xx answer or out of attempts."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_created_at_id", "created_at", "id"),
        Index("ix_webhook_deliveries_job_id_event", "job_id", "event"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_delivery_id)
    tenant_id: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # set when a sender takes the delivery for an attempt; only that sender may record it
    take_token: Mapped[str | None] = mapped_column(String(32))


class WebhookAttempt(Base):
    """One try at sending a delivery: the answer's status code, or why there was none."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery_id_id", "delivery_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)


class WebhookSecret(Base):
    """A tenant's signing secret. After a rotation the previous one stays valid (signs
    too) until `expires_at`."""

    __tablename__ = "webhook_secrets"
    __table_args__ = (Index("ix_webhook_secrets_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


def new_monitor_id() -> str:
    return f"mon_{uuid.uuid4().hex}"


def new_alert_id() -> str:
    return f"alr_{uuid.uuid4().hex}"


class Monitor(Base):
    """A sentiment monitor: a classifier over a feed of texts, a window and an alert rule.

    `state` and `recover_at_or_below` change only by compare-and-set (db/monitors.py)."""

    __tablename__ = "monitors"
    __table_args__ = (Index("ix_monitors_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_monitor_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(255))
    labels: Mapped[list[str]] = mapped_column(JSON, default=list)
    negative_label: Mapped[str] = mapped_column(String(255))
    window_items: Mapped[int | None] = mapped_column(Integer)
    window_seconds: Mapped[int | None] = mapped_column(Integer)
    share_above: Mapped[float | None] = mapped_column(Float)
    rise_above: Mapped[float | None] = mapped_column(Float)
    min_items: Mapped[int] = mapped_column(Integer)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    recover_at_or_below: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class MonitorItem(Base):
    """One posted text; its label is filled in when its batch's predict job succeeds."""

    __tablename__ = "monitor_items"
    __table_args__ = (
        Index("ix_monitor_items_monitor_id_id", "monitor_id", "id"),
        Index("ix_monitor_items_monitor_id_created_at", "monitor_id", "created_at"),
        Index("ix_monitor_items_job_id", "job_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    monitor_id: Mapped[str] = mapped_column(ForeignKey("monitors.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(String(40))
    text: Mapped[str] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(String(255))
    score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    classified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class MonitorStat(Base):
    """One evaluation of a monitor's window (after a predict job of its feed succeeded)."""

    __tablename__ = "monitor_stats"
    __table_args__ = (Index("ix_monitor_stats_monitor_id_id", "monitor_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    monitor_id: Mapped[str] = mapped_column(ForeignKey("monitors.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(String(40))
    items: Mapped[int] = mapped_column(Integer)
    negative_share: Mapped[float] = mapped_column(Float)
    previous_share: Mapped[float | None] = mapped_column(Float)
    shares: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16))
    alerted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class MonitorAlert(Base):
    """An alert a monitor raised: listed on the monitor and sent as a `monitor.alert`
    webhook delivery (queued in the same transaction)."""

    __tablename__ = "monitor_alerts"
    __table_args__ = (Index("ix_monitor_alerts_monitor_id_created_at", "monitor_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_alert_id)
    monitor_id: Mapped[str] = mapped_column(ForeignKey("monitors.id", ondelete="CASCADE"))
    stat_id: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(Text)
    negative_share: Mapped[float] = mapped_column(Float)
    previous_share: Mapped[float | None] = mapped_column(Float)
    items: Mapped[int] = mapped_column(Integer)
    delivery_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class LeaderLease(Base):
    """Who holds a duty that one process at a time performs (the reconciler, the webhook
    sender, retry publishing), until when by the database's clock, and for which term: the
    term grows by one each time another process takes the lease over."""

    __tablename__ = "leader_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    term: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
