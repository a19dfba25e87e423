"""Fault injection for tests/faults, loaded at start by processes whose PYTHONPATH holds this
directory. Each hook is keyed by an environment variable (set by tests/faults/scenarios.py's
fault_env) and fires only for the job that asks for it:

- MODELYARD_TEST_POISON_DURATION_S: a no-op job of exactly this duration_s kills its worker
  process with SIGKILL, as a job that crashes the interpreter every time would.
- MODELYARD_TEST_TRANSIENT_ON_CANCEL_DURATION_S: a no-op job of this duration_s waits until
  its cancel is asked (read from the database) and then fails with a transient error at
  once, before its heartbeat can see the cancel: a cancel racing a transient error.
- MODELYARD_TEST_IGNORE_STOP_DURATION_S: a no-op job of this duration_s sleeps that long
  and never looks at its stop flag, as a runner hung in native code would.
- MODELYARD_TEST_DIE_BEFORE_CLAIM: (set on one worker only) the worker kills itself with
  SIGKILL when a job's message reaches it, after kombu took the message into `unacked` and
  before the claim: a consumer killed between receive and claim.
- MODELYARD_TEST_DB_ERROR_MARKER: recording the outputs of a job whose spec holds this text
  fails with a database error (DataError: a row the database refuses).
- MODELYARD_TEST_COMMIT_DROP_SUFFIX: the finishing transaction of a fine-tune with this
  `suffix` commits, then raises OperationalError once, as a connection that drops while
  COMMIT's answer is on its way: the worker cannot tell whether it landed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

_POISON = os.environ.get("MODELYARD_TEST_POISON_DURATION_S")
_TRANSIENT_ON_CANCEL = os.environ.get("MODELYARD_TEST_TRANSIENT_ON_CANCEL_DURATION_S")
_IGNORE_STOP = os.environ.get("MODELYARD_TEST_IGNORE_STOP_DURATION_S")
_DB_ERROR_MARKER = os.environ.get("MODELYARD_TEST_DB_ERROR_MARKER")
_DIE_BEFORE_CLAIM = os.environ.get("MODELYARD_TEST_DIE_BEFORE_CLAIM")
_COMMIT_DROP_SUFFIX = os.environ.get("MODELYARD_TEST_COMMIT_DROP_SUFFIX")


def _is(value: float, wanted: str | None) -> bool:
    return wanted is not None and value == float(wanted)


def _cancel_requested(job_id: str) -> bool:
    from core.settings import Settings
    from db.models import Job
    from db.session import session_scope

    with session_scope(Settings().database_url, readonly=True) as session:
        job = session.get(Job, job_id)
        return bool(job is not None and job.cancel_requested)


if _POISON or _TRANSIENT_ON_CANCEL or _IGNORE_STOP:
    import workers.noop as _noop

    _original_run = _noop.NoopRunner.run

    def _injected_run(self: Any, spec: dict[str, Any], ctx: Any) -> Any:
        duration = float(spec.get("duration_s", 0.0))
        if _is(duration, _POISON):
            os.kill(os.getpid(), signal.SIGKILL)
        if _is(duration, _TRANSIENT_ON_CANCEL):
            from core.errors import TransientJobError

            deadline = time.monotonic() + duration
            while time.monotonic() < deadline and not _cancel_requested(ctx.job_id):
                time.sleep(0.01)
            raise TransientJobError("injected transient error (raced with a cancel)")
        if _is(duration, _IGNORE_STOP):
            time.sleep(duration)
            from workers.runners import RunResult

            return RunResult()
        return _original_run(self, spec, ctx)

    _noop.NoopRunner.run = _injected_run  # type: ignore[method-assign]

if _DB_ERROR_MARKER:
    import json

    import db.outputs as _outputs

    _original_add_outputs = _outputs.add_outputs

    def _failing_add_outputs(session: Any, job_id: str, *args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import DataError

        from db.models import Job

        job = session.get(Job, job_id)
        if job is not None and str(_DB_ERROR_MARKER) in json.dumps(job.spec):
            raise DataError(
                "INSERT INTO outputs", {}, Exception("injected: the database refused the row")
            )
        return _original_add_outputs(session, job_id, *args, **kwargs)

    _outputs.add_outputs = _failing_add_outputs

if _DIE_BEFORE_CLAIM:
    import workers.lifecycle as _lifecycle

    def _die_before_claim(self: Any, job_id: str) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    _lifecycle.JobLifecycle.execute = _die_before_claim  # type: ignore[method-assign]

if _COMMIT_DROP_SUFFIX and "worker" in sys.orig_argv:  # workers only: others never finish jobs
    from contextlib import contextmanager

    import workers.lifecycle as _lifecycle_for_commit

    _armed: list[str] = []  # the finishing transaction registered a marked model
    _fired: list[str] = []
    _original_register = _lifecycle_for_commit.register_model
    _original_scope = _lifecycle_for_commit.session_scope

    def _marked_register(session: Any, **kwargs: Any) -> Any:
        if f":{_COMMIT_DROP_SUFFIX}:" in str(kwargs.get("name", "")) and not _fired:
            _armed.append(str(kwargs.get("job_id")))
        return _original_register(session, **kwargs)

    @contextmanager
    def _scope_dropping_after_commit(url: str, **kwargs: Any) -> Any:
        with _original_scope(url, **kwargs) as session:
            yield session
        if _armed and not _fired:
            from sqlalchemy.exc import OperationalError

            _fired.append(_armed.pop())
            raise OperationalError(
                "COMMIT", {}, Exception("injected: connection lost after COMMIT was sent")
            )

    _lifecycle_for_commit.register_model = _marked_register  # type: ignore[assignment]
    _lifecycle_for_commit.session_scope = _scope_dropping_after_commit  # type: ignore[assignment]
