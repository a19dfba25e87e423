"""Log records carry the job (and tenant) in context, in text and in JSON."""

from __future__ import annotations

import json
import logging

from core.logs import TEXT_FORMAT, ContextFilter, JsonFormatter, log_context


def record(message: str) -> logging.LogRecord:
    rec = logging.LogRecord("workers.x", logging.INFO, __file__, 1, message, None, None)
    ContextFilter().filter(rec)
    return rec


def test_json_lines_carry_the_job_and_tenant_in_context() -> None:
    with log_context(job_id="job_1", tenant="acme"):
        inside = json.loads(JsonFormatter().format(record("claimed")))
    outside = json.loads(JsonFormatter().format(record("idle")))
    assert inside["job_id"] == "job_1" and inside["tenant"] == "acme"
    assert inside["message"] == "claimed" and inside["level"] == "INFO"
    assert "job_id" not in outside and "tenant" not in outside


def test_text_lines_name_the_job() -> None:
    with log_context(job_id="job_2"):
        line = logging.Formatter(TEXT_FORMAT).format(record("step 3"))
    assert "workers.x [job_2]: step 3" in line
    assert "[" not in logging.Formatter(TEXT_FORMAT).format(record("idle")).split("workers.x")[1]
