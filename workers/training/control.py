"""The files through which a worker and the training processes it started talk.

A fine-tune runs in child processes (workers/training/launch.py starts them with torchrun,
workers/training/child.py is each one's entry point); the worker keeps the job's lifecycle
(leases, cancel and pause flags, the finish). They share the attempt's control directory:

    control/stop          the worker asks the ranks to stop (written once; its flags say why)
    control/progress      rank 0's latest progress (fraction and detail), for the heartbeat
    control/pid-<rank>    each rank's pid, so a hard stop reaches every rank
    control/outcome-<r>   how rank r ended: succeeded (rank 0, with the result), stopped, or
                          failed with a typed reason

Every file is written whole (a temporary file renamed into place), so a reader sees the old
content or the new, never half.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.enums import FineTuneMethod, FineTuneTask
from workers.runners import TrainedModel

logger = logging.getLogger(__name__)

LAUNCH_ENV = "MODELYARD_TRAINING_LAUNCH"  # the job, as JSON, in a rank's environment
STOP_FILE = "stop"
PROGRESS_FILE = "progress"
PID_PREFIX = "pid-"
OUTCOME_PREFIX = "outcome-"


@dataclass(frozen=True)
class StopRequest:
    """Why the ranks must stop; `lease_lost` also means: save nothing."""

    lease_lost: bool = False
    cancelled: bool = False
    paused: bool = False
    timed_out: bool = False
    given_back: bool = False


@dataclass(frozen=True)
class Outcome:
    """How a rank ended. `status` is succeeded, stopped or failed; a failure carries the
    typed reason it was classified as, and whether it may be retried."""

    status: str
    rank: int
    lease_lost: bool = False
    transient: bool = False
    failure: str | None = None
    message: str = ""
    result: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    at: float = 0.0  # when it ended (time.time()): the first failure is the cause of the rest


def model_record(trained: TrainedModel) -> dict[str, Any]:
    """A trained model as rank 0's outcome carries it (JSON)."""
    return {
        "path": str(trained.path),
        "base_model": trained.base_model,
        "task": trained.task.value,
        "method": trained.method.value,
        "labels": trained.labels,
        "metrics": trained.metrics,
        "adapter": trained.adapter,
    }


def trained_model(record: dict[str, Any]) -> TrainedModel:
    """The trained model an outcome's `model_record` names."""
    return TrainedModel(
        path=Path(record["path"]),
        base_model=str(record["base_model"]),
        task=FineTuneTask(record["task"]),
        method=FineTuneMethod(record["method"]),
        labels=list(record.get("labels", [])),
        metrics={k: float(v) for k, v in record.get("metrics", {}).items()},
        adapter=bool(record.get("adapter", False)),
    )


def _write_whole(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("unreadable control file %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


class ControlFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def reset(self) -> None:
        """An empty control directory (one left by a launch of the same attempt goes)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    # stop
    def ask_stop(self, request: StopRequest) -> None:
        _write_whole(self.root / STOP_FILE, json.dumps(asdict(request)))

    def stop_request(self) -> StopRequest | None:
        data = _read_json(self.root / STOP_FILE)
        if data is None:
            return None
        known = StopRequest.__dataclass_fields__
        return StopRequest(**{k: bool(v) for k, v in data.items() if k in known})

    # progress
    def write_progress(self, fraction: float, detail: dict[str, Any]) -> None:
        _write_whole(
            self.root / PROGRESS_FILE, json.dumps({"fraction": fraction, "detail": detail})
        )

    def progress(self) -> tuple[float, dict[str, Any]] | None:
        data = _read_json(self.root / PROGRESS_FILE)
        if data is None:
            return None
        detail = data.get("detail")
        return float(data.get("fraction", 0.0)), detail if isinstance(detail, dict) else {}

    # pids
    def write_pid(self, rank: int, pid: int) -> None:
        _write_whole(self.root / f"{PID_PREFIX}{rank}", str(pid))

    def pids(self) -> list[int]:
        found: list[int] = []
        for path in self.root.glob(f"{PID_PREFIX}*"):
            try:
                found.append(int(path.read_text().strip()))
            except (OSError, ValueError):
                continue
        return found

    # outcomes
    def write_outcome(self, outcome: Outcome) -> None:
        _write_whole(self.root / f"{OUTCOME_PREFIX}{outcome.rank}", json.dumps(asdict(outcome)))

    def outcomes(self) -> dict[int, Outcome]:
        """Each rank's outcome, by rank (ranks that wrote none are missing)."""
        found: dict[int, Outcome] = {}
        for path in self.root.glob(f"{OUTCOME_PREFIX}*"):
            data = _read_json(path)
            if data is None:
                continue
            known = Outcome.__dataclass_fields__
            try:
                outcome = Outcome(**{k: v for k, v in data.items() if k in known})
            except TypeError as exc:
                logger.warning("unreadable outcome %s: %s", path, exc)
                continue
            found[outcome.rank] = outcome
        return found
