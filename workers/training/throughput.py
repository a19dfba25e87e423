"""How fast this host fine-tunes, and the estimate a job's first event carries.

When a fine-tune's training ends, rank 0 records the tokens per second its attempt trained
at (non-padding input tokens over every rank, evaluations and checkpoints included in the
time) in `<data dir>/throughput/<host>.json`, one entry per base model, device kind and
number of training processes: the last one wins. Before the next fine-tune of that base
model on this host trains, `estimate_training` turns its planned tokens into an ETA with
that figure, or says that there is none.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workers.training.schedule import Schedule

logger = logging.getLogger(__name__)

THROUGHPUT_DIR = "throughput"


@dataclass(frozen=True)
class Throughput:
    """One finished training run's throughput."""

    tokens_per_s: float
    tokens: int  # trained in that attempt
    seconds: float  # that attempt's training time
    job_id: str
    method: str
    measured_at: str  # ISO 8601, UTC


def setup_key(base_model: str, device: str, processes: int) -> str:
    """What a throughput is kept for: the base model, the device kind (cpu, cuda) and the number
    of training processes."""
    return f"{base_model} on {device.split(':', 1)[0]} x{processes}"


class ThroughputLog:
    """This host's measured throughputs, in one JSON file under the data dir (a data dir shared
    by several hosts keeps one file per host). Writers on the host take a file lock and
    replace the file whole."""

    def __init__(self, data_dir: Path, host: str | None = None) -> None:
        self.path = data_dir / THROUGHPUT_DIR / f"{host or socket.gethostname()}.json"

    def _entries(self) -> dict[str, Any]:
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("throughput file %s unreadable (%s); starting a new one", self.path, exc)
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def last(self, key: str) -> Throughput | None:
        entry = self._entries().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return Throughput(**entry)
        except TypeError:
            logger.warning("throughput entry %r in %s unreadable", key, self.path)
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def record(self, key: str, throughput: Throughput) -> None:
        """Keep `throughput` as the throughput of `key`; a file that cannot be written (a full
        disk) costs the next estimate its ETA, never the job."""
        try:
            with self._locked():
                entries = self._entries()
                entries[key] = asdict(throughput)
                self._replace(entries)
        except OSError as exc:
            logger.warning("throughput of job %s not recorded: %s", throughput.job_id, exc)
            return
        logger.info(
            "job %s trained %s at %.1f tokens/s", throughput.job_id, key, throughput.tokens_per_s
        )

    def _replace(self, entries: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".throughput-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(entries, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def measured(job_id: str, method: str, tokens: int, seconds: float) -> Throughput | None:
    """The throughput of an attempt that trained `tokens` in `seconds` (None: it trained none)."""
    if tokens <= 0 or seconds <= 0:
        return None
    return Throughput(
        tokens_per_s=round(tokens / seconds, 2),
        tokens=tokens,
        seconds=round(seconds, 3),
        job_id=job_id,
        method=method,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def planned_tokens(schedule: Schedule, lengths: Sequence[int]) -> int:
    """Non-padding input tokens the schedule's steps will train on: an epoch's tokens (every
    training example once, after the cut to max_length) per epoch the steps make."""
    return round(sum(lengths) * schedule.total_steps / schedule.steps_per_epoch)


def estimate_training(
    schedule: Schedule,
    lengths: Sequence[int],
    start_step: int,
    key: str,
    measured_before: Throughput | None,
) -> dict[str, Any]:
    """The first event's estimate: planned steps and tokens, and the ETA of the steps still
    to run (from `start_step`) at the throughput this host last measured for `key`, or why
    there is no ETA."""
    tokens = planned_tokens(schedule, lengths)
    estimate: dict[str, Any] = {"steps": schedule.total_steps, "tokens": tokens}
    if measured_before is None or not measured_before.tokens_per_s > 0:
        return {
            **estimate,
            "eta_s": None,
            "tokens_per_s": None,
            "eta_basis": f"no ETA: no fine-tune of {key} has finished on this worker yet",
        }
    left = tokens * max(schedule.total_steps - start_step, 0) / max(schedule.total_steps, 1)
    return {
        **estimate,
        "eta_s": round(left / measured_before.tokens_per_s, 1),
        "tokens_per_s": measured_before.tokens_per_s,
        "eta_basis": (
            f"{measured_before.tokens_per_s} tokens/s measured on this worker by job "
            f"{measured_before.job_id} ({measured_before.method}, {measured_before.measured_at})"
        ),
    }
