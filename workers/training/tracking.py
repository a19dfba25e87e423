"""Experiment trackers a fine-tune reports to besides our own database (off unless the
deployment's `tracking` setting or the job's spec names them), through the Trainer's own
integrations.

TensorBoard: rank 0 writes event files (every logged metric by step, the training
arguments, the model's config) into the attempt's own `tensorboard/` directory, which is
published to the shared store when the attempt's training ends, however it ends. A job
resumed on attempt 2 has a second run beside the first; `GET /v1/jobs/{id}/tensorboard`
and `modelyard tensorboard JOB` give all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers.integrations.integration_utils import TensorBoardCallback
from transformers.trainer_callback import TrainerCallback

from core.enums import Tracker
from core.settings import Settings
from core.specs import FineTuneSpec
from core.storage import artifact_store
from workers.training.layout import TENSORBOARD_DIR

logger = logging.getLogger(__name__)


def trackers_for(spec: FineTuneSpec, settings: Settings) -> list[Tracker]:
    """The job's own choice when its spec names one ([] turns tracking off), else the
    deployment's."""
    return list(spec.tracking if spec.tracking is not None else settings.tracking)


def tracking_callbacks(trackers: list[Tracker], work_dir: Path) -> list[TrainerCallback]:
    if Tracker.TENSORBOARD not in trackers:
        return []
    callback = TensorBoardCallback()  # type: ignore[no-untyped-call]
    # Where transformers would read TENSORBOARD_LOGGING_DIR from the environment (one
    # directory for the whole process): the writer is made on rank 0 at train begin.
    callback.logging_dir = str(work_dir / TENSORBOARD_DIR)
    return [callback]


def tracking_result(trackers: list[Tracker], work_dir: Path, data_dir: Path) -> dict[str, Any]:
    """What the job's result says about its trackers: where each run lies."""
    if Tracker.TENSORBOARD not in trackers:
        return {}
    log_dir = (work_dir / TENSORBOARD_DIR).resolve()
    return {Tracker.TENSORBOARD.value: {"log_dir": str(log_dir.relative_to(data_dir.resolve()))}}


def end_tracking(trainer: Any, trackers: list[Tracker], work_dir: Path, settings: Settings) -> None:
    """Once the attempt's training and final evaluation are over, however they ended: close
    the event writers (the final evaluation reopened one after the Trainer closed its own)
    and copy the event files to the shared store (a no-op without one), so the API on
    another host can hand them out. Best effort: the job's outcome does not depend on it."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            callback.tb_writer.close()
            callback.tb_writer = None
    log_dir = work_dir / TENSORBOARD_DIR
    if Tracker.TENSORBOARD not in trackers or not log_dir.is_dir():
        return
    try:
        artifact_store(settings).publish(log_dir)
    except Exception as exc:
        logger.warning("TensorBoard files of %s not published: %s", work_dir, exc)
