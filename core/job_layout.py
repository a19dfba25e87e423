"""Where a job's files lie under the data dir (and under the same keys in the shared
store): the workers write there, the API reads what a job made available for download.
The layout of an attempt's own directory is workers/training/layout.py's."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings

ATTEMPTS_DIR = "attempts"
TENSORBOARD_DIR = "tensorboard"  # an attempt's TensorBoard event files (tracking on)
WANDB_DIR = "wandb"  # an attempt's W&B run files (offline runs: all of it)


def job_dir(settings: Settings, job_id: str, tenant_id: str | None = None) -> Path:
    """A job's artifacts: under its tenant's directory, named by the server-made job id only."""
    root = settings.data_dir.resolve()
    if tenant_id is None:
        return root / "jobs" / job_id
    return root / "tenants" / tenant_id / "jobs" / job_id


def attempt_dir(job: Path, attempt: int) -> Path:
    return job / ATTEMPTS_DIR / str(attempt)
