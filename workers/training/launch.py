"""Runs a fine-tune in child processes: torchrun starts `training_procs` ranks (DDP over
gloo on CPU, NCCL on GPUs); a one-process fine-tune is one rank forked from a server that
has the training code imported. Never in the worker process itself, so the worker never
holds CUDA, the model or the training memory, and a stop by force ends processes, not
threads.

The worker keeps the job's lifecycle: its heartbeat renews the leases and reads the cancel
and pause flags, and this runner relays them to the ranks through the attempt's control
files (workers/training/control.py): a stop request, which the ranks agree on at the end of
a step (each saves a checkpoint unless the lease was lost), and rank 0's progress back to
the heartbeat. Ranks write metrics, events and checkpoint rows themselves, under the
attempt's fence, like the in-process runner did; the final model is registered by the
worker's lifecycle after its own fence check.

A rank that dies (killed, out of memory, a crash) ends the whole group: torchrun stops the
others and the attempt ends with a transient `worker_lost`, so the job is retried and
resumes from its last checkpoint. Ranks that have not stopped `stop_grace_s / 2` after a
stop request are killed, before the heartbeat would restart the worker for them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import multiprocessing.context
import os
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr

from core.enums import FailureType
from core.errors import JobStopped, PermanentJobError, StaleAttempt, TransientJobError
from core.settings import Settings
from core.storage import artifact_store
from db.session import session_scope
from db.training import list_checkpoints
from workers.context import RunContext
from workers.runners import RunResult, discard_model
from workers.training.control import (
    LAUNCH_ENV,
    ControlFiles,
    Outcome,
    StopRequest,
    trained_model,
)
from workers.training.layout import CHECKPOINTS_DIR, CONTROL_DIR, attempt_dir, job_dir

logger = logging.getLogger(__name__)

POLL_S = 0.2
CHILD_MODULE = "workers.training.child"


def settings_payload(settings: Settings) -> dict[str, Any]:
    """The settings as JSON, secrets included (they travel in the child's environment, as
    the worker's own came in its)."""
    data = settings.model_dump(mode="json")
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
    return data


def control_files(settings: Settings, ctx: RunContext) -> ControlFiles:
    work_dir = attempt_dir(job_dir(settings, ctx.job_id, ctx.tenant_id), ctx.attempt)
    return ControlFiles(work_dir / CONTROL_DIR)


def torchrun_command(procs: int, control: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={procs}",
        "--max-restarts=0",
        "--monitor-interval=0.1",
        "-m",
        CHILD_MODULE,
        str(control),
    ]


def _stop_request(ctx: RunContext) -> StopRequest:
    return StopRequest(
        lease_lost=ctx.lease_lost,
        cancelled=ctx.cancelled,
        paused=ctx.paused,
        timed_out=ctx.timed_out,
        given_back=ctx.given_back,
    )


def _kill(pid: int) -> None:
    """SIGKILL a process and its process group (a rank leads its own session)."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


class Ranks(Protocol):
    """The training processes of one attempt, as the worker follows them: torchrun (which
    ends the others when one rank dies) or the one rank forked from the preloaded server."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int | None: ...


class ForkedRank:
    """The single rank of a one-process fine-tune, forked from a server process that has
    imported the training code once (torch, transformers, peft: seconds per job otherwise).
    No torchrun: one process needs no rendezvous. It leads a session of its own, so a kill
    reaches what it started too."""

    def __init__(self, process: BaseProcess) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        pid = self._process.pid
        assert pid is not None  # started
        return pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f"training rank {self.pid}", timeout or 0)
        return self._process.exitcode


@functools.cache
def _rank_server() -> multiprocessing.context.ForkServerContext:
    """The forkserver ranks are forked from, started on the first one-process fine-tune
    with the training code imported (never in the worker process itself)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([CHILD_MODULE])
    return context


def _forked_rank(control: str, launch: str) -> None:
    """The forked rank's entry point (in this light module, so the worker can name it
    without importing the training code)."""
    os.setsid()
    os.environ[LAUNCH_ENV] = launch
    from workers.training.child import exit_now, main

    exit_now(main([control]))


def start_ranks(procs: int, control: ControlFiles, launch: str) -> Ranks:
    if procs == 1:
        process = _rank_server().Process(
            target=_forked_rank, args=(str(control.root), launch), name="training-rank"
        )
        process.start()
        return ForkedRank(process)
    return subprocess.Popen(
        torchrun_command(procs, control.root),
        env={**os.environ, LAUNCH_ENV: launch},
        start_new_session=True,
    )


class ChildProcessRunner:
    """The Runner of fine-tune jobs: the training itself runs in child processes (the
    forked rank, or torchrun's ranks)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def run(self, raw_spec: dict[str, Any], ctx: RunContext) -> RunResult:
        settings = self._settings
        control = control_files(settings, ctx)
        control.reset()
        procs = settings.training_procs
        launch = {
            "settings": settings_payload(settings),
            "spec": raw_spec,
            "job_id": ctx.job_id,
            "attempt": ctx.attempt,
            "device": ctx.device,
            "tenant_id": ctx.tenant_id,
            "worker": ctx.worker,
            "worker_pid": os.getpid(),
        }
        logger.info("job %s: training in %d child process(es)", ctx.job_id, procs)
        started = time.monotonic()
        child = start_ranks(procs, control, json.dumps(launch))
        killed = False
        try:
            killed = self._follow(child, control, ctx)
        except BaseException:
            self._kill_all(child, control)
            raise
        finally:
            self._relay_progress(control, ctx)
        try:
            if killed:
                raise JobStopped(f"job {ctx.job_id}: training processes killed ({ctx.stop_reason})")
            returncode = child.poll()
            assert returncode is not None  # _follow returns once the ranks have ended
            logger.info(
                "job %s: training processes ended (exit %s) after %.1fs",
                ctx.job_id,
                returncode,
                time.monotonic() - started,
            )
            return self._result(control, returncode, procs, ctx)
        except Exception:
            remove_unrecorded_checkpoints(settings, ctx)
            raise

    def _follow(self, child: Ranks, control: ControlFiles, ctx: RunContext) -> bool:
        """Wait for the ranks, relaying progress and the stop request; True when they had
        to be killed."""
        asked_at: float | None = None
        asked = StopRequest()
        grace = self._settings.stop_grace_s / 2
        while True:
            if asked_at is None:
                ctx.stop_event.wait(POLL_S)  # a stop is passed on at once, not at the next poll
            else:
                time.sleep(POLL_S)
            if child.poll() is not None:
                self._kill_all(child, control)  # a rank torchrun left behind
                return False
            self._relay_progress(control, ctx)
            if not ctx.stop_event.is_set():
                continue
            request = _stop_request(ctx)
            if asked_at is None or request != asked:  # a lease lost after a pause: save nothing
                control.ask_stop(request)
                asked = request
                if asked_at is None:
                    asked_at = time.monotonic()
                    logger.info("job %s: asked the training processes to stop", ctx.job_id)
            elif time.monotonic() - asked_at > grace:
                logger.warning(
                    "job %s: training processes did not stop within %.0fs; killing them",
                    ctx.job_id,
                    grace,
                )
                self._kill_all(child, control)
                return True

    @staticmethod
    def _kill_all(child: Ranks, control: ControlFiles) -> None:
        for pid in control.pids():
            _kill(pid)
        _kill(child.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)

    @staticmethod
    def _relay_progress(control: ControlFiles, ctx: RunContext) -> None:
        found = control.progress()
        if found is not None:
            fraction, detail = found
            ctx.report_progress(fraction, **detail)

    def _result(
        self, control: ControlFiles, returncode: int, procs: int, ctx: RunContext
    ) -> RunResult:
        """The attempt's result, from the ranks' outcomes. A rank that wrote none died
        (killed, or a crash below Python), and the others' errors (a collective whose peer
        vanished) follow from it; otherwise the first failure is the cause."""
        outcomes = control.outcomes()
        first = outcomes.get(0)
        if first is not None and first.status == "succeeded" and returncode == 0:
            result = _run_result(first)
            if not ctx.lease_lost:
                return result
            # the worker was paused past its lease while the ranks went on to the end
            discard_model(result)
            raise StaleAttempt(f"job {ctx.job_id}: attempt {ctx.attempt} lost the job")
        if any(o.lease_lost for o in outcomes.values()):
            ctx.lease_lost = True
            ctx.stop_event.set()
            raise StaleAttempt(f"job {ctx.job_id}: attempt {ctx.attempt} lost the job")
        silent = [rank for rank in range(procs) if rank not in outcomes]
        failed = [o for o in outcomes.values() if o.status == "failed"]
        if failed and not silent:
            raise _job_error(min(failed, key=lambda o: (o.at, o.rank)))
        if first is not None and first.status == "stopped" and not silent:
            raise JobStopped(f"job {ctx.job_id} stopped: {ctx.stop_reason}")
        how = f"exit status {returncode}"
        if returncode < 0:
            how = f"killed by {signal.Signals(-returncode).name}"
        raise TransientJobError(
            f"a training process died (rank {', '.join(map(str, silent)) or '?'}; torchrun "
            f"{how}); the job resumes from its last checkpoint",
            FailureType.WORKER_LOST,
        )


def remove_unrecorded_checkpoints(settings: Settings, ctx: RunContext) -> None:
    """Remove what the attempt's ranks left in its checkpoint directory that no row names:
    a checkpoint renamed into place whose row was never written (torchrun ends rank 0
    wherever it is when another rank dies, between the rename and the row included) and a
    half-written staging directory. Called once the ranks have all ended, so none of it
    will be recorded now, and no attempt resumes from a checkpoint without a row
    (DbTrainingIO.latest_checkpoint). Best effort: without the database it keeps all."""
    root = attempt_dir(job_dir(settings, ctx.job_id, ctx.tenant_id), ctx.attempt)
    found = sorted(p for p in (root / CHECKPOINTS_DIR).glob("*") if p.is_dir())
    if not found:
        return
    data_dir = settings.data_dir.resolve()
    try:
        with session_scope(settings.database_url, readonly=True) as session:
            recorded = {
                (data_dir / c.path).resolve() for c in list_checkpoints(session, ctx.job_id)
            }
    except Exception as exc:
        logger.warning("job %s: checkpoints without a row kept: %s", ctx.job_id, exc)
        return
    store = artifact_store(settings)
    for path in found:
        if path.resolve() in recorded:
            continue
        logger.info("job %s: removing %s, which no checkpoint row names", ctx.job_id, path)
        try:
            store.remove(path)
        except Exception as exc:  # the local copy goes anyway; no row names the shared one
            logger.warning("job %s: shared copy of %s not removed: %s", ctx.job_id, path, exc)
        shutil.rmtree(path, ignore_errors=True)


def _job_error(outcome: Outcome) -> TransientJobError | PermanentJobError:
    failure = FailureType(outcome.failure or FailureType.RUNTIME_ERROR.value)
    message = outcome.message if outcome.rank == 0 else f"rank {outcome.rank}: {outcome.message}"
    if outcome.transient:
        return TransientJobError(message, failure)
    return PermanentJobError(message, failure)


def _run_result(outcome: Outcome) -> RunResult:
    model = outcome.model
    trained = trained_model(model) if model is not None else None
    return RunResult(result=outcome.result, trained_model=trained)
