from __future__ import annotations

from enum import StrEnum


class JobKind(StrEnum):
    GENERATE = "generate"
    NOOP = "noop"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class EventType(StrEnum):
    STATUS = "status"
    PROGRESS = "progress"
    LOG = "log"
    ERROR = "error"


class FailureType(StrEnum):
    """Typed reason a job failed (or why an attempt ended)."""

    WORKER_LOST = "worker_lost"
    MODEL_NOT_FOUND = "model_not_found"
    INVALID_SPEC = "invalid_spec"
    OUT_OF_MEMORY = "out_of_memory"
    RUNTIME_ERROR = "runtime_error"
    TRANSIENT_ERROR = "transient_error"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"


QUEUE_FOR_KIND: dict[JobKind, str] = {JobKind.GENERATE: "generate", JobKind.NOOP: "generate"}
MAINTENANCE_QUEUE = "maintenance"
