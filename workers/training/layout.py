"""Where a fine-tune attempt writes: a directory of its own, named by its attempt number.

    <data dir>/[tenants/<tenant>/]jobs/<job id>/
        attempts/<n>/                      written by attempt n (the fencing token) only
            checkpoints/checkpoint-<step>/ whole checkpoints (checkpoints.py); attempt n
                                           removes its older ones only after a fenced row
            checkpoints/.staging/          the checkpoint being written
            last_step                      the step reached, for the next attempt's figures
            model/                         the final model; the lifecycle publishes and
                                           registers it after its fence check
            control/                       the worker and its training processes talk
                                           through these files (control.py)
            tensorboard/, wandb/           TensorBoard event files and W&B run files, when
                                           tracking is on (rank 0; published to the store
                                           at the end)

A later attempt reads an earlier one's checkpoint where its row (written under the earlier
attempt's fence) points, and writes nothing there: a stale attempt that wakes up can only
touch its own directory, which no row written after it lost the job names.
"""

from __future__ import annotations

from pathlib import Path

from core.job_layout import ATTEMPTS_DIR, TENSORBOARD_DIR, WANDB_DIR, attempt_dir, job_dir

__all__ = [
    "ATTEMPTS_DIR",
    "CHECKPOINTS_DIR",
    "CONTROL_DIR",
    "MODEL_DIR",
    "STEP_MARKER",
    "TENSORBOARD_DIR",
    "WANDB_DIR",
    "attempt_dir",
    "job_dir",
    "read_step_marker",
    "steps_reached_before",
]

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
STEP_MARKER = "last_step"
CONTROL_DIR = "control"


def read_step_marker(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def steps_reached_before(job: Path, attempt: int) -> int | None:
    """The furthest step the job's earlier attempts wrote in their step markers."""
    reached = [
        step
        for n in range(1, attempt)
        if (step := read_step_marker(attempt_dir(job, n) / STEP_MARKER)) is not None
    ]
    return max(reached, default=None)
