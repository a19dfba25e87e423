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

A later attempt reads an earlier one's checkpoint where its row (written under the earlier
attempt's fence) points, and writes nothing there: a stale attempt that wakes up can only
touch its own directory, which no row written after it lost the job names.
"""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings

ATTEMPTS_DIR = "attempts"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
STEP_MARKER = "last_step"
CONTROL_DIR = "control"


def job_dir(settings: Settings, job_id: str, tenant_id: str | None = None) -> Path:
    """A job's artifacts: under its tenant's directory, named by the server-made job id only."""
    root = settings.data_dir.resolve()
    if tenant_id is None:
        return root / "jobs" / job_id
    return root / "tenants" / tenant_id / "jobs" / job_id


def attempt_dir(job: Path, attempt: int) -> Path:
    return job / ATTEMPTS_DIR / str(attempt)


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
