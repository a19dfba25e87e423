"""Logging for every Modelyard process: text or JSON lines, with the job (and tenant)
being worked on attached to each record from context variables."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from core.settings import Settings

_job_id: ContextVar[str | None] = ContextVar("modelyard_job_id", default=None)
_tenant: ContextVar[str | None] = ContextVar("modelyard_tenant", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s%(context)s: %(message)s"


@contextmanager
def log_context(*, job_id: str | None = None, tenant: str | None = None) -> Iterator[None]:
    """Records logged inside carry `job_id` / `tenant`."""
    tokens = []
    if job_id is not None:
        tokens.append((_job_id, _job_id.set(job_id)))
    if tenant is not None:
        tokens.append((_tenant, _tenant.set(tenant)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Copies the context variables onto each record (and a short `context` for text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id, tenant = _job_id.get(), _tenant.get()
        parts = [p for p in (job_id, tenant and f"tenant={tenant}") if p]
        setattr(record, "job_id", job_id)  # noqa: B010 (LogRecord has no such attributes)
        setattr(record, "tenant", tenant)  # noqa: B010
        setattr(record, "context", f" [{' '.join(parts)}]" if parts else "")  # noqa: B010
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message, job_id, tenant."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for key in ("job_id", "tenant"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """The root logger of this process: level and format from settings."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
