"""Which errors end a job attempt with a retry, and which fail it once.

Named transient errors (the database or the broker unreachable, a full disk, and
out-of-memory when `retry_out_of_memory` is set) are retried with backoff and
jitter up to the job's `max_attempts`; everything else fails once with a typed reason.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable

import redis
from kombu.exceptions import OperationalError as BrokerOperationalError

from core.enums import FailureType
from core.errors import JobError, PermanentJobError, TransientJobError
from core.settings import Settings
from db.session import DATABASE_UNAVAILABLE

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
BROKER_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    BrokerOperationalError,
)
_OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "not enough memory",
    "cannot allocate memory",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA and CPU allocation failures (torch raises a RuntimeError on CPU) and MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def classify(exc: BaseException, settings: Settings, device: str = "") -> JobError:
    """The JobError an exception out of a runner stands for."""
    if isinstance(exc, PermanentJobError) and exc.failure is FailureType.OUT_OF_MEMORY:
        if settings.retry_out_of_memory:
            return TransientJobError(exc.message, FailureType.OUT_OF_MEMORY)
        return exc
    if isinstance(exc, JobError):
        return exc
    where = f" on {device}" if device else ""
    if is_out_of_memory(exc):
        message = f"out of memory{where}: {exc}"
        if settings.retry_out_of_memory:
            return TransientJobError(message, FailureType.OUT_OF_MEMORY)
        return PermanentJobError(message, FailureType.OUT_OF_MEMORY)
    if is_disk_full(exc):
        return TransientJobError(f"disk full: {exc}", FailureType.DISK_FULL)
    if isinstance(exc, DATABASE_UNAVAILABLE):
        return TransientJobError(
            f"database unreachable: {type(exc).__name__}", FailureType.DATABASE_UNAVAILABLE
        )
    if isinstance(exc, BROKER_UNAVAILABLE):
        return TransientJobError(
            f"broker unreachable: {type(exc).__name__}", FailureType.BROKER_UNAVAILABLE
        )
    return PermanentJobError(f"{type(exc).__name__}: {exc}", FailureType.RUNTIME_ERROR)


def retry_delay(settings: Settings, attempts: int) -> float:
    """The backoff before attempt `attempts + 1`: doubling from retry_backoff_s, capped."""
    return float(
        min(settings.retry_backoff_s * 2 ** max(attempts - 1, 0), settings.retry_backoff_max_s)
    )


def jittered_delay(
    settings: Settings, attempts: int, rand: Callable[[], float] = random.random
) -> float:
    """retry_delay shortened by a random fraction up to retry_jitter, so jobs that failed
    together (a database restart) do not all come back at the same moment."""
    return retry_delay(settings, attempts) * (1.0 - settings.retry_jitter * rand())
