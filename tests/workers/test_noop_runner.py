from __future__ import annotations

import threading

import pytest

from core.errors import JobStopped
from workers.context import RunContext
from workers.noop import NoopRunner


def test_noop_waits_and_reports_progress() -> None:
    ctx = RunContext(job_id="j", attempt=1, device="cpu")
    result = NoopRunner().run({"duration_s": 0.2}, ctx)
    assert result.outputs == []
    assert ctx.progress == 1.0


def test_noop_stops_when_asked() -> None:
    ctx = RunContext(job_id="j", attempt=1, device="cpu")
    ctx.cancelled = True
    threading.Timer(0.1, ctx.stop_event.set).start()
    with pytest.raises(JobStopped):
        NoopRunner().run({"duration_s": 30}, ctx)
    assert 0 < ctx.progress < 0.5
