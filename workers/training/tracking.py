"""Experiment trackers a fine-tune reports to besides our own database (off unless the
deployment's `tracking` setting or the job's spec names them), through the Trainer's own
integrations. Only rank 0 reports; each attempt is a run of its own (a job resumed on
attempt 2 has a second run beside the first).

- TensorBoard: event files (every logged metric by step, the training arguments, the
  model's config) in the attempt's own `tensorboard/` directory, published to the shared
  store when the attempt ends, however it ends. `GET /v1/jobs/{id}/tensorboard` and
  `modelyard tensorboard JOB` give all attempts' runs.
- MLflow: a run named `<job id>-attempt-<n>` in the deployment's experiment on its
  tracking server, tagged with the job, started here (so its id is known and the final
  evaluation lands in it too) and ended with the attempt's outcome: FINISHED, KILLED
  (cancelled, paused, handed back) or FAILED. A tracking server that cannot be reached
  when the attempt starts costs the job its MLflow run, not its training: the attempt
  says so in an event and goes on.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from transformers.integrations.integration_utils import MLflowCallback, TensorBoardCallback
from transformers.trainer_callback import TrainerCallback

from core.enums import Tracker
from core.errors import JobStopped
from core.settings import Settings
from core.specs import FineTuneSpec
from core.storage import artifact_store
from workers.context import RunContext
from workers.training.io import TrainingIO
from workers.training.layout import TENSORBOARD_DIR

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0


def trackers_for(spec: FineTuneSpec, settings: Settings) -> list[Tracker]:
    """The job's own choice when its spec names one ([] turns tracking off), else the
    deployment's."""
    return list(spec.tracking if spec.tracking is not None else settings.tracking)


def run_status(error: BaseException | None) -> str:
    """The MLflow status an attempt's run ends with."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, JobStopped) else "FAILED"


class Tracking:
    """One attempt's trackers, on rank 0 (`reporting`); nothing at all on the others."""

    def __init__(
        self,
        trackers: list[Tracker],
        settings: Settings,
        ctx: RunContext,
        io: TrainingIO,
        reporting: bool,
    ) -> None:
        self._trackers = trackers if reporting else []
        self._settings = settings
        self._ctx = ctx
        self._io = io
        self._log_dir = io.work_dir / TENSORBOARD_DIR
        self._mlflow_run: dict[str, str] | None = None

    def start(self, spec: FineTuneSpec) -> list[TrainerCallback]:
        """Open what needs opening before training; the Trainer callbacks that report."""
        callbacks: list[TrainerCallback] = []
        if Tracker.TENSORBOARD in self._trackers:
            tensorboard = TensorBoardCallback()  # type: ignore[no-untyped-call]
            # where transformers would read TENSORBOARD_LOGGING_DIR from the environment
            # (one directory for the whole process); the writer opens at train begin
            tensorboard.logging_dir = str(self._log_dir)
            callbacks.append(tensorboard)
        if Tracker.MLFLOW in self._trackers and self._start_mlflow_run(spec):
            callbacks.append(MLflowCallback())  # type: ignore[no-untyped-call]
        return callbacks

    def _start_mlflow_run(self, spec: FineTuneSpec) -> bool:
        import mlflow

        ctx, settings = self._ctx, self._settings
        name = f"{ctx.job_id}-attempt-{ctx.attempt}"
        uri = settings.mlflow_tracking_uri.get_secret_value()
        try:
            if uri.startswith(("http://", "https://")):
                # one quick look first: mlflow's own client retries a dead server for minutes
                httpx.get(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S).raise_for_status()
            mlflow.set_tracking_uri(uri)
            experiment = mlflow.set_experiment(settings.mlflow_experiment)
            tags = {
                "modelyard.job_id": ctx.job_id,
                "modelyard.attempt": str(ctx.attempt),
                "modelyard.base_model": spec.base_model,
                "modelyard.task": spec.task.value,
                "modelyard.method": spec.method.value,
            }
            run = mlflow.start_run(run_name=name, tags=tags)
        except Exception as exc:  # the server is down or refuses: train anyway
            logger.warning(
                "job %s: no MLflow run for this attempt: %s", ctx.job_id, type(exc).__name__
            )
            self._io.event("MLflow tracking server unreachable: no run for this attempt")
            return False
        self._mlflow_run = {
            "run_id": run.info.run_id,
            "run_name": name,
            "experiment_id": experiment.experiment_id,
            "experiment": settings.mlflow_experiment,
        }
        self._io.event("MLflow run started", dict(self._mlflow_run))
        return True

    def result(self) -> dict[str, Any]:
        """What the job's result says about its trackers: where each run lies."""
        found: dict[str, Any] = {}
        if Tracker.TENSORBOARD in self._trackers:
            log_dir = self._log_dir.resolve().relative_to(self._settings.data_dir.resolve())
            found[Tracker.TENSORBOARD.value] = {"log_dir": str(log_dir)}
        if self._mlflow_run is not None:
            found[Tracker.MLFLOW.value] = dict(self._mlflow_run)
        return found

    def end(self, trainer: Any, error: BaseException | None) -> None:
        """Once training and the final evaluation are over, however they ended: close the
        event writers (the final evaluation reopened one after the Trainer closed its own)
        and publish the event files; end the MLflow run with the attempt's outcome. Best
        effort: the job's outcome does not depend on it."""
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.close()
                callback.tb_writer = None
        if Tracker.TENSORBOARD in self._trackers and self._log_dir.is_dir():
            try:
                artifact_store(self._settings).publish(self._log_dir)
            except Exception as exc:
                logger.warning("job %s: TensorBoard files not published: %s", self._ctx.job_id, exc)
        if self._mlflow_run is not None:
            import mlflow

            try:
                mlflow.end_run(status=run_status(error))
            except Exception as exc:
                logger.warning("job %s: MLflow run not ended: %s", self._ctx.job_id, exc)
