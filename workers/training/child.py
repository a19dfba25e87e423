"""One training rank: `python -m torch.distributed.run ... -m workers.training.child CONTROL`.

Started by the worker (workers/training/launch.py) with the job in its environment. Every
rank runs the same FineTuneRunner; rank 0 alone writes to the database (metrics, events,
checkpoint rows, under the attempt's fence) and the final model, the others read only.

A stop asked by the worker (control/stop) is agreed on by every rank at the end of a step
(an all-reduce of each rank's flags), so all of them stop after the same step and save the
same checkpoint; a write refused by the fence on rank 0 reaches the others the same way. A
rank whose worker or launcher is gone exits at once: nothing would record its work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from core.errors import JobStopped, StaleAttempt, TransientJobError
from core.logs import configure_logging
from core.settings import Settings
from workers.context import RunContext
from workers.failures import classify
from workers.model_refs import ResolvedModel
from workers.runners import RunResult
from workers.training.control import (
    LAUNCH_ENV,
    ControlFiles,
    Outcome,
    StopRequest,
    model_record,
)
from workers.training.db_io import DbTrainingIO
from workers.training.io import CheckpointInfo, DatasetRows, MetricPoint, TrainingIO
from workers.training.runner import FineTuneRunner

logger = logging.getLogger(__name__)

WATCH_S = 0.2
PROGRESS_EVERY_S = 0.2
ORPHANED_EXIT = 3


@dataclass
class RankContext(RunContext):
    """A rank's RunContext: rank 0 also writes its progress to the control files."""

    control: ControlFiles | None = None
    _written_at: float = field(default=0.0)

    def report_progress(self, fraction: float, **detail: Any) -> None:
        super().report_progress(fraction, **detail)
        if self.control is None:
            return
        now = time.monotonic()
        if now - self._written_at >= PROGRESS_EVERY_S or fraction >= 1.0:
            self._written_at = now
            try:
                self.control.write_progress(self.progress, self.detail)
            except OSError as exc:
                logger.debug("progress not written: %s", exc)


class ReadOnlyIO:
    """The TrainingIO of ranks other than 0: reads as rank 0 does, writes nothing."""

    def __init__(self, inner: TrainingIO) -> None:
        self._inner = inner
        self.work_dir = inner.work_dir

    def dataset(self, dataset_id: str) -> DatasetRows:
        return self._inner.dataset(dataset_id)

    def resolve_model(self, ref: str) -> ResolvedModel:
        return self._inner.resolve_model(ref)

    def record_metrics(self, points: Sequence[MetricPoint]) -> None:
        return None

    def record_checkpoint(self, checkpoint: CheckpointInfo) -> bool:
        return False

    def remove_pruned(self, paths: Sequence[Path]) -> None:
        return None

    def latest_checkpoint(self) -> CheckpointInfo | None:
        return self._inner.latest_checkpoint()

    def checkpoint_of(self, job_id: str, step: int | None) -> CheckpointInfo:
        return self._inner.checkpoint_of(job_id, step)

    def event(self, message: str, data: dict[str, Any] | None = None) -> None:
        return None

    def discard_after(self, step: int) -> int:
        return step

    def close(self) -> None:
        return None


def _apply(ctx: RunContext, request: StopRequest, lease_lost: bool) -> None:
    ctx.lease_lost = ctx.lease_lost or lease_lost or request.lease_lost
    ctx.cancelled = request.cancelled
    ctx.paused = request.paused
    ctx.timed_out = request.timed_out
    ctx.given_back = request.given_back
    ctx.stop_event.set()


class StopWatcher:
    """Polls the control files for a stop request, and ends this rank when the worker or
    torchrun is gone. With one rank the request is applied at once; with several, at the
    end of a step by `AgreedStopCallback`, which every rank passes in step."""

    def __init__(self, control: ControlFiles, ctx: RunContext, worker_pid: int, world: int):
        self._control = control
        self._ctx = ctx
        self._worker_pid = worker_pid
        self._world = world
        self._parent = os.getppid()
        self.requested = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stop-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while True:
            if os.getppid() != self._parent or not _alive(self._worker_pid):
                logger.error("job %s: the worker is gone; this rank exits", self._ctx.job_id)
                logging.shutdown()
                os._exit(ORPHANED_EXIT)
            if not self.requested.is_set():
                request = self._control.stop_request()
                if request is not None:
                    self.requested.set()
                    if self._world == 1:
                        _apply(self._ctx, request, False)
            time.sleep(WATCH_S)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AgreedStopCallback(TrainerCallback):
    """Every rank stops after the same step: at each step's end a rank looks for the stop
    request itself (so training stops at the end of the step in which it appeared), and
    the ranks' flags (a request seen, a write refused) are combined with an all-reduce.
    Must come before StopCallback, which acts on them."""

    def __init__(
        self, watcher: StopWatcher, control: ControlFiles, ctx: RunContext, device: str, world: int
    ) -> None:
        self._watcher = watcher
        self._control = control
        self._ctx = ctx
        self._device = device
        self._world = world
        self.seen_at: int | None = None  # the step at whose end this rank saw the request
        self.stopped_at: int | None = None  # the step all ranks stopped after

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        ctx = self._ctx
        seen = self._watcher.requested.is_set() or self._control.stop_request() is not None
        if seen and self.seen_at is None:
            self.seen_at = state.global_step
        stop, lease_lost = seen or ctx.stop_event.is_set(), ctx.lease_lost
        if self._world > 1:
            flags = torch.tensor(
                [float(stop), float(lease_lost)],
                device=self._device if dist.get_backend() == "nccl" else "cpu",
            )
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, lease_lost = (bool(v) for v in flags.tolist())
        if not stop:
            return
        if self.stopped_at is None:
            self.stopped_at = state.global_step
        if not (ctx.stop_event.is_set() and ctx.lease_lost == lease_lost):
            _apply(ctx, self._control.stop_request() or StopRequest(), lease_lost)


def rank_device(device: str, local_rank: int, world: int) -> str:
    """Each rank on its own GPU (the worker's CUDA_VISIBLE_DEVICES names them), or the CPU."""
    if not device.startswith("cuda"):
        return "cpu"
    if world == 1:
        return device
    return f"cuda:{local_rank}"


def _outcome_of(
    rank: int, run: Callable[[], RunResult], settings: Settings, ctx: RunContext, is_main: bool
) -> Outcome:
    try:
        result = run()
    except StaleAttempt:
        return Outcome("stopped", rank, lease_lost=True)
    except JobStopped:
        return Outcome("stopped", rank, lease_lost=ctx.lease_lost)
    except Exception as exc:
        logger.exception("job %s: rank %d failed", ctx.job_id, rank)
        error = classify(exc, settings, ctx.device)
        failure = getattr(error, "failure", None)
        return Outcome(
            "failed",
            rank,
            transient=isinstance(error, TransientJobError),
            failure=failure.value if failure is not None else None,
            message=error.message,
        )
    if not is_main:
        return Outcome("succeeded", rank)
    trained = result.trained_model
    model = model_record(trained) if trained is not None else None
    return Outcome("succeeded", rank, result=result.result, model=model)


def main(argv: list[str]) -> int:
    control = ControlFiles(Path(argv[0]))
    launch = json.loads(os.environ.pop(LAUNCH_ENV))
    settings = Settings(**launch["settings"])
    configure_logging(settings)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = rank_device(launch["device"], int(os.environ.get("LOCAL_RANK", "0")), world)
    control.write_pid(rank, os.getpid())
    ctx = RankContext(
        job_id=launch["job_id"],
        attempt=int(launch["attempt"]),
        device=device,
        tenant_id=launch["tenant_id"],
        worker=launch["worker"],
        control=control if rank == 0 else None,
    )
    watcher = StopWatcher(control, ctx, int(launch["worker_pid"]), world)
    watcher.start()
    agreement = AgreedStopCallback(watcher, control, ctx, device, world)

    def io_factory(run_ctx: RunContext) -> TrainingIO:
        io = DbTrainingIO(settings, run_ctx)
        return io if rank == 0 else ReadOnlyIO(io)

    runner = FineTuneRunner(settings, io_factory, world_size=world, callbacks=[agreement])
    outcome = _outcome_of(
        rank, lambda: runner.run(launch["spec"], ctx), settings, ctx, is_main=rank == 0
    )
    stops = {"stop_seen_at": agreement.seen_at, "stopped_at": agreement.stopped_at}
    control.write_outcome(dataclasses.replace(outcome, extra=stops, at=time.time()))
    logger.info("job %s: rank %d of %d ended %s", ctx.job_id, rank, world, outcome.status)
    return 0 if outcome.status == "succeeded" else 1


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown (process group, CUDA context, the loaded
    model: seconds, and nothing in it is still needed once the outcome is written)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
