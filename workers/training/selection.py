"""Which checkpoint becomes the model: the best evaluated one on the job's metric.

Trainer tracks the best evaluation (`TrainerState.best_metric`, `best_global_step`) and the
checkpoint saved with it (`best_model_checkpoint`), keeps that checkpoint out of rotation
and loads its weights when training ends (`load_best_model_at_end`, schedule.py). The
state travels in each checkpoint's trainer_state.json, so a resumed attempt knows the best
so far; but that checkpoint may lie in an earlier attempt's directory
(`attempts/<n>/checkpoints`), at a path the earlier attempt saw, on another host. Resuming,
the runner finds it among the job's recorded checkpoints (fetched from shared storage when
needed) and points the state at that copy; if it is gone, the best is forgotten and chosen
again among the evaluations still to come, and an event says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from core.errors import PermanentJobError
from workers.training.checkpoints import TRAINER_STATE
from workers.training.io import CheckpointInfo, TrainingIO

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BestCheckpoint:
    """The checkpoint whose weights the job's model is, and its evaluation score."""

    step: int
    metric: str
    score: float

    def as_result(self) -> dict[str, Any]:
        return {"step": self.step, "metric": self.metric, "score": self.score}


def best_checkpoint(state: TrainerState, metric: str) -> BestCheckpoint | None:
    """The best checkpoint Trainer loaded at the end; None when no evaluation was saved as
    best (none ran, or every score was NaN), and the model is the last weights."""
    if state.best_model_checkpoint is None or state.best_global_step is None:
        return None
    if state.best_metric is None:
        return None
    return BestCheckpoint(step=state.best_global_step, metric=metric, score=state.best_metric)


@dataclass(frozen=True)
class ResumedBest:
    """The best so far, as the resumed checkpoint's state records it."""

    step: int
    score: float
    path: Path | None  # this host's copy; None: it is gone


def resumed_best(io: TrainingIO, job_id: str, resume: CheckpointInfo) -> ResumedBest | None:
    """The best checkpoint recorded in the state of `resume`, located through the job's
    recorded checkpoints; None when that state names no best."""
    try:
        state = json.loads((resume.path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as exc:
        logger.warning("job %s: no trainer state in %s: %s", job_id, resume.path, exc)
        return None
    step, score = state.get("best_global_step"), state.get("best_metric")
    if not isinstance(step, int) or not isinstance(score, int | float):
        return None
    if state.get("best_model_checkpoint") is None:  # that evaluation was never saved
        return ResumedBest(step=step, score=float(score), path=None)
    if step == resume.step:
        return ResumedBest(step=step, score=float(score), path=resume.path)
    try:
        found = io.checkpoint_of(job_id, step)
    except PermanentJobError:
        return ResumedBest(step=step, score=float(score), path=None)
    return ResumedBest(step=step, score=float(score), path=found.path)


class ResumedBestCallback(TrainerCallback):
    """Once Trainer has read the resumed state, points its best checkpoint at this host's
    copy, or forgets the best when that copy is gone (Trainer would otherwise compare later
    evaluations with a score whose weights it cannot load)."""

    def __init__(self, best: ResumedBest) -> None:
        self._best = best

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._best.path is not None:
            state.best_model_checkpoint = str(self._best.path)
            return
        state.best_model_checkpoint = None
        state.best_global_step = None
        state.best_metric = None
