"""Checkpoints that appear whole or not at all.

Trainer writes a checkpoint file by file into `checkpoint-N`; a crash or a full
disk halfway leaves a directory that looks like a checkpoint and cannot be
loaded. Here each checkpoint is written into a staging directory beside the
others, synced, then renamed to `checkpoint-N` in one step, so every
`checkpoint-N` directory is complete and the last good one survives a failed save.

The run directory is the attempt's own (workers/training/layout.py), staging included, so
two attempts of a job never write or remove each other's files. Older checkpoints are
removed (save_total_limit) by `rotate_checkpoints_of_attempt`, which the caller runs only
once the newest checkpoint's row is written under the attempt's fence, and then removes
from the shared store too (`TrainingIO.remove_pruned`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from core.enums import FailureType
from core.errors import TransientJobError
from workers.failures import is_disk_full

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
TRAINER_STATE = "trainer_state.json"
_NO_SPACE_MARKERS = (
    "no space left",
    "file too large",
    "disk quota",
    "os error 28",
    "os error 27",
    "os error 122",
    "file write failed",
)
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def out_of_space(exc: BaseException) -> bool:
    """A write failed for lack of room: OSError errnos, or the messages safetensors (Rust)
    and torch.save (C++) raise instead of an OSError."""
    return is_disk_full(exc) or any(m in str(exc).lower() for m in _NO_SPACE_MARKERS)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory, newest first; staging ones excluded."""
    found: list[tuple[int, Path]] = []
    if not run_dir.is_dir():
        return found
    for child in run_dir.iterdir():
        match = _CHECKPOINT_NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)


def last_good_checkpoint(run_dir: Path) -> str:
    """How a `disk_full` error names what a retry resumes from: `step N` of the newest
    complete checkpoint in `run_dir`, or `none`."""
    kept = complete_checkpoints(run_dir)
    return f"step {kept[0][0]}" if kept else "none"


def rotate_checkpoints_of_attempt(
    run_dir: Path, save_total_limit: int | None, best_model_checkpoint: str | None
) -> list[Path]:
    """Keep the newest `save_total_limit` checkpoints of this attempt's run directory (and
    its best one, however old); only directories directly inside `run_dir` are considered.
    Returns the checkpoints it removed, oldest first.

    transformers protects the best checkpoint by comparing path strings; the best is named
    here as `run_dir` names its checkpoints, so another spelling of the same directory
    (a symlink, a relative data dir) cannot leave it unprotected. A best checkpoint outside
    `run_dir` (an earlier attempt's) is not this rotation's to remove anyway."""
    before = complete_checkpoints(run_dir)
    protected = None
    if best_model_checkpoint is not None:
        best = Path(best_model_checkpoint)
        if best.resolve().parent == run_dir.resolve():
            protected = str(run_dir / best.name)
    rotate_checkpoints(
        output_dir=str(run_dir),
        save_total_limit=save_total_limit,
        best_model_checkpoint=protected,
        use_mtime=True,
    )
    return [path for _, path in reversed(before) if not path.exists()]


def _wait_for_every_rank() -> None:
    """A barrier across the training processes; nothing with one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointTrainer(Trainer):
    """A Trainer whose `_save_checkpoint` writes into `<output>/.staging/checkpoint-N` and
    renames the finished directory to `<output>/checkpoint-N`. It removes no older
    checkpoint: see `rotate_checkpoints_of_attempt`.

    A save that fails for lack of space removes its staging directory and ends the
    attempt with a transient `disk_full` error; the job is retried with backoff and
    resumes from the last good checkpoint.
    """

    _staging_root: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_root is not None:
            return self._staging_root
        run_dir: str = super()._get_output_dir(trial)
        return run_dir

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """With several processes each writes its part (rank 0 the weights and optimizer,
        every rank its RNG state) into the staging directory, which rank 0 alone prepares
        and renames; they wait for each other in between."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / STAGING_DIR
        main = self.args.should_save
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        _wait_for_every_rank()
        self._staging_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)
            _wait_for_every_rank()
            if main:
                _fsync_tree(staging / name)
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if not out_of_space(exc):
                raise
            last = last_good_checkpoint(run_dir)
            logger.warning("writing %s failed for lack of space: %s", name, exc)
            raise TransientJobError(
                f"no space left writing {name} ({exc}); the last good checkpoint is {last}",
                FailureType.DISK_FULL,
            ) from exc
        finally:
            self._staging_root = None
        if main:
            self._publish(staging / name, run_dir / name)
            shutil.rmtree(staging, ignore_errors=True)
        _wait_for_every_rank()
        self._fix_best_checkpoint(staging, run_dir, run_dir / name)

    @staticmethod
    def _publish(staged: Path, final: Path) -> None:
        """Rename the finished checkpoint into place; one saved again at the same step
        (after a resume) replaces the old one only once the new one is whole."""
        old: Path | None = None
        if final.exists():
            old = final.with_name(f"{STAGING_DIR}-old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(staged, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _fix_best_checkpoint(self, staging: Path, run_dir: Path, final: Path) -> None:
        """Trainer recorded the best checkpoint under the staging path; point it at the
        renamed directory, in memory and in the checkpoint's trainer_state.json."""
        best = self.state.best_model_checkpoint
        if best is None or Path(best).parent != staging:
            return
        self.state.best_model_checkpoint = str(run_dir / Path(best).name)
        if self.args.should_save and (final / TRAINER_STATE).exists():
            tmp = final / f"{TRAINER_STATE}.tmp"
            self.state.save_to_json(str(tmp))
            os.replace(tmp, final / TRAINER_STATE)
