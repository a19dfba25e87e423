"""Experiment trackers a fine-tune reports to besides our own database (off unless the
deployment's `tracking` setting or the job's spec names them), through the Trainer's own
integrations. Only rank 0 reports; each attempt is a run of its own (a job resumed on
attempt 2 has a second run beside the first).

- TensorBoard: event files (every logged metric by step, the training arguments, the
  model's config) in the attempt's own `tensorboard/` directory, published to the shared
  store when the attempt ends, however it ends. `GET /v1/jobs/{id}/tensorboard` and
  `modelyard tensorboard JOB` give all attempts' runs.
- Weights & Biases: a run named `<job id>-attempt-<n>` in the deployment's project, started
  here like MLflow's; `offline` mode writes it into the attempt's `wandb/` directory
  (published with the rest; `wandb sync` uploads it later). It ends with exit code 0 when
  the attempt trained to the end, 1 otherwise.
- MLflow: a run named `<job id>-attempt-<n>` in the deployment's experiment on its
  tracking server, tagged with the job, started here (so its id is known and the final
  evaluation lands in it too) and ended with the attempt's outcome: FINISHED, KILLED
  (cancelled, paused, handed back) or FAILED. A tracking server that cannot be reached
  when the attempt starts costs the job its MLflow run, not its training: the attempt
  says so in an event and goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
from transformers.integrations.integration_utils import (
    MLflowCallback,
    TensorBoardCallback,
    WandbCallback,
)
from transformers.trainer_callback import TrainerCallback

from core.enums import Tracker
from core.errors import JobStopped
from core.settings import Settings
from core.specs import FineTuneSpec
from core.storage import artifact_store
from workers.context import RunContext
from workers.training.io import TrainingIO
from workers.training.layout import TENSORBOARD_DIR, WANDB_DIR

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
        self._wandb_dir = io.work_dir / WANDB_DIR
        self._mlflow_run: dict[str, str] | None = None
        self._wandb_run: Any = None
        self._wandb_result: dict[str, str] | None = None

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
        if Tracker.WANDB in self._trackers and self._start_wandb_run(spec):
            callbacks.append(WandbCallback())  # type: ignore[no-untyped-call]
        return callbacks

    @property
    def _run_name(self) -> str:
        """The attempt's run on every tracker that names runs."""
        return f"{self._ctx.job_id}-attempt-{self._ctx.attempt}"

    def _tags(self, spec: FineTuneSpec) -> dict[str, str]:
        return {
            "modelyard.job_id": self._ctx.job_id,
            "modelyard.attempt": str(self._ctx.attempt),
            "modelyard.base_model": spec.base_model,
            "modelyard.task": spec.task.value,
            "modelyard.method": spec.method.value,
        }

    def _start_wandb_run(self, spec: FineTuneSpec) -> bool:
        import wandb

        ctx, settings = self._ctx, self._settings
        name = self._run_name
        self._wandb_dir.mkdir(parents=True, exist_ok=True)
        options = wandb.Settings(
            silent=True,
            api_key=settings.wandb_api_key.get_secret_value() or None,
            disable_git=True,
            save_code=False,
            x_disable_stats=True,
        )
        try:
            run = wandb.init(
                project=settings.wandb_project,
                name=name,
                dir=str(self._wandb_dir),
                mode=settings.wandb_mode,
                config={"modelyard": self._tags(spec)},
                settings=options,
            )
        except Exception as exc:  # no network, a refused key: train anyway
            logger.warning(
                "job %s: no W&B run for this attempt: %s", ctx.job_id, type(exc).__name__
            )
            self._io.event("W&B unreachable: no run for this attempt")
            return False
        self._wandb_run = run
        found = {"run_id": run.id, "run_name": name, "project": settings.wandb_project}
        found["mode"] = settings.wandb_mode
        if settings.wandb_mode == "offline":
            run_dir = Path(run.dir).parent.resolve()
            found["dir"] = str(run_dir.relative_to(settings.data_dir.resolve()))
        self._wandb_result = found
        self._io.event("W&B run started", dict(found))
        return True

    def _start_mlflow_run(self, spec: FineTuneSpec) -> bool:
        import mlflow

        ctx, settings = self._ctx, self._settings
        name = self._run_name
        uri = settings.mlflow_tracking_uri.get_secret_value()
        try:
            if uri.startswith(("http://", "https://")):
                # one quick look first: mlflow's own client retries a dead server for minutes
                httpx.get(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S).raise_for_status()
            mlflow.set_tracking_uri(uri)
            experiment = mlflow.set_experiment(settings.mlflow_experiment)
            run = mlflow.start_run(run_name=name, tags=self._tags(spec))
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
        if self._wandb_result is not None:
            found[Tracker.WANDB.value] = dict(self._wandb_result)
        return found

    def end(self, trainer: Any, error: BaseException | None) -> None:
        """Once training and the final evaluation are over, however they ended: close the
        event writers (the final evaluation reopened one after the Trainer closed its own),
        finish the W&B run, publish the event and run files, and end the MLflow run with the
        attempt's outcome. Best effort: the job's outcome does not depend on it."""
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.close()
                callback.tb_writer = None
        if self._wandb_run is not None:
            import wandb

            try:
                self._wandb_run.finish(exit_code=0 if error is None else 1)
                wandb.teardown()  # waits for wandb's own process to have written the run out
            except Exception as exc:
                logger.warning("job %s: W&B run not finished: %s", self._ctx.job_id, exc)
        for tracker, folder in (
            (Tracker.TENSORBOARD, self._log_dir),
            (Tracker.WANDB, self._wandb_dir),
        ):
            if tracker in self._trackers and folder.is_dir():
                try:
                    artifact_store(self._settings).publish(folder)
                except Exception as exc:
                    logger.warning("job %s: %s not published: %s", self._ctx.job_id, folder, exc)
        if self._mlflow_run is not None:
            import mlflow

            try:
                mlflow.end_run(status=run_status(error))
            except Exception as exc:
                logger.warning("job %s: MLflow run not ended: %s", self._ctx.job_id, exc)
