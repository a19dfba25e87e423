"""OpenAI's shapes of our own rows: files are datasets (and batch result files), fine-tuning
jobs and batches are jobs, events and checkpoints are theirs. Status names are mapped here
and nowhere else."""

from __future__ import annotations

import base64
import csv
import io
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from core.enums import DatasetSchema, EventType, FineTuneObjective, FineTuneTask, JobStatus
from core.specs import (
    DpoSpec,
    Hyperparameters,
    ReinforcementSpec,
    completion_window,
    default_hyperparameters,
)
from db.models import Checkpoint, Dataset, Job, JobEvent, Metric


def base_learning_rate(task: FineTuneTask) -> float:
    """The learning rate of `learning_rate_multiplier` 1.0: the task's default."""
    return default_hyperparameters(task).learning_rate


FINE_TUNING_STATUS: dict[JobStatus, str] = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "running",
    JobStatus.PAUSED: "paused",
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.EXPIRED: "failed",
}

FAILED_STATUSES = frozenset(s.value for s, shown in FINE_TUNING_STATUS.items() if shown == "failed")

BATCH_STATUS: dict[JobStatus, str] = {
    JobStatus.QUEUED: "validating",
    JobStatus.RUNNING: "in_progress",
    JobStatus.PAUSED: "in_progress",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.EXPIRED: "expired",
}

BATCH_FILE_ID = re.compile(r"^(job_[0-9a-f]{32})-(output|error)$")
RESULTS_FILE_ID = re.compile(r"^(job_[0-9a-f]{32})-results$")
RESULTS_FILENAME = "step_metrics.csv"
# OpenAI's columns, each filled from the metric of the same quantity where a job records it
RESULTS_COLUMNS: dict[str, str] = {
    "train_loss": "train_loss",
    "train_accuracy": "train_mean_token_accuracy",
    "valid_loss": "eval_loss",
    "valid_mean_token_accuracy": "eval_mean_token_accuracy",
}
EVENT_ID_PREFIX = "ftevent-"
CHECKPOINT_ID = re.compile(r"^ftckpt-(\d+)-(job_[0-9a-f]{32})$")


def unix(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp())


def purpose_of(dataset: Dataset) -> str:
    return "batch" if dataset.schema == DatasetSchema.BATCH_REQUESTS.value else "fine-tune"


def batch_file_id(job_id: str, name: Literal["output", "error"]) -> str:
    return f"{job_id}-{name}"


def results_file_id(job_id: str) -> str:
    return f"{job_id}-results"


def results_csv(metrics: Iterable[Metric]) -> str:
    """A fine-tuning job's step metrics as OpenAI's results file: a row per step, `step`
    and OpenAI's four columns first (a cell empty where the step has no such figure), then
    `epoch` and every other metric the job recorded, its `eval_` prefix written `valid_`."""
    by_step: dict[int, dict[str, float]] = {}
    names: set[str] = set()
    for metric in metrics:
        row = by_step.setdefault(metric.step, {})
        row[metric.name] = metric.value
        if metric.epoch is not None:
            row["epoch"] = metric.epoch
        names.add(metric.name)
    mapped = set(RESULTS_COLUMNS.values())
    extra = sorted(names - mapped - {"epoch"})
    header = ["step", *RESULTS_COLUMNS, "epoch"]
    header += [f"valid_{n.removeprefix('eval_')}" if n.startswith("eval_") else n for n in extra]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for step in sorted(by_step):
        row = by_step[step]
        sources = [*RESULTS_COLUMNS.values(), "epoch", *extra]
        writer.writerow([step, *("" if row.get(n) is None else repr(row[n]) for n in sources)])
    return out.getvalue()


def results_content(metrics: Iterable[Metric]) -> bytes:
    """The results file's content: its CSV base64-encoded, as OpenAI serves it (clients
    written for OpenAI decode it with `base64.b64decode`)."""
    return base64.b64encode(results_csv(metrics).encode())


def file_of_results(job: Job, size: int) -> dict[str, Any]:
    return {
        "id": results_file_id(job.id),
        "object": "file",
        "bytes": size,
        "created_at": unix(job.finished_at or job.created_at),
        "filename": RESULTS_FILENAME,
        "purpose": "fine-tune-results",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


class OpenAIList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, data: list[dict[str, Any]], has_more: bool) -> OpenAIList:
        return cls(
            data=data,
            has_more=has_more,
            first_id=data[0]["id"] if data else None,
            last_id=data[-1]["id"] if data else None,
        )


def file_of_dataset(ds: Dataset) -> dict[str, Any]:
    return {
        "id": ds.id,
        "object": "file",
        "bytes": ds.size_bytes,
        "created_at": unix(ds.created_at),
        "filename": ds.filename,
        "purpose": purpose_of(ds),
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def file_of_batch(job: Job, name: Literal["output", "error"], size: int) -> dict[str, Any]:
    return {
        "id": batch_file_id(job.id, name),
        "object": "file",
        "bytes": size,
        "created_at": unix(job.finished_at or job.created_at),
        "filename": f"{job.id}_{name}.jsonl",
        "purpose": "batch_output",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _error(job: Job) -> dict[str, Any] | None:
    if job.status not in (JobStatus.FAILED.value, JobStatus.EXPIRED.value):
        return None
    return {"code": job.error_type, "message": job.error_message or "", "param": None}


def fine_tuning_job(job: Job) -> dict[str, Any]:
    spec = job.spec
    hp = Hyperparameters.model_validate(spec.get("hyperparameters", {}))
    result = job.result or {}
    succeeded = job.status == JobStatus.SUCCEEDED.value
    hyperparameters: dict[str, Any] = {
        "n_epochs": int(hp.epochs) if float(hp.epochs).is_integer() else hp.epochs,
        "batch_size": hp.batch_size,
        "learning_rate_multiplier": hp.learning_rate
        / base_learning_rate(FineTuneTask(spec["task"])),
    }
    objective = spec.get("objective", FineTuneObjective.SUPERVISED.value)
    method_hyperparameters = dict(hyperparameters)
    if objective == FineTuneObjective.DPO.value:
        method_hyperparameters["beta"] = DpoSpec.model_validate(spec.get("dpo") or {}).beta
    method: dict[str, Any] = {"hyperparameters": method_hyperparameters}
    if objective == FineTuneObjective.REINFORCEMENT.value:
        settings = ReinforcementSpec.model_validate(spec["reinforcement"])
        method_hyperparameters["eval_interval"] = hp.eval_steps or "auto"
        method_hyperparameters.update(
            generations=settings.generations,
            max_completion_tokens=settings.max_completion_tokens,
            temperature=settings.temperature,
        )
        method["grader"] = spec["reinforcement"]["grader"]
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "error": _error(job),
        "fine_tuned_model": result.get("model") if succeeded else None,
        "finished_at": unix(job.finished_at),
        "hyperparameters": hyperparameters,
        "model": spec["base_model"],
        "organization_id": job.tenant_id,
        "result_files": [results_file_id(job.id)] if succeeded else [],
        "seed": hp.seed,
        "status": FINE_TUNING_STATUS[JobStatus(job.status)],
        "trained_tokens": result.get("trained_tokens") if succeeded else None,
        "training_file": spec["training_dataset"],
        "validation_file": spec.get("validation_dataset"),
        "estimated_finish": None,
        "integrations": None,
        "metadata": job.metadata_ or None,
        "suffix": spec.get("suffix"),
        "method": {"type": objective, objective: method},
    }


def _event_level(event: JobEvent, data: dict[str, Any]) -> str:
    """`error` for an error event and for the status event that failed the job (it carries
    the error's message), as OpenAI's events say a failure; else `info`."""
    failed = event.type == EventType.STATUS.value and data.get("status") in FAILED_STATUSES
    return "error" if failed or event.type == EventType.ERROR.value else "info"


def fine_tuning_event(event: JobEvent) -> dict[str, Any]:
    data = event.data or {}
    metrics = event.type == "progress"
    message = event.message
    if not message and metrics:
        step, total = data.get("step"), data.get("total_steps")
        message = f"step {step}/{total}" if step is not None else "progress"
    if metrics and isinstance(data.get("loss"), int | float):
        data = {**data, "train_loss": data["loss"]}  # OpenAI's (and our metrics') name
    return {
        "id": f"{EVENT_ID_PREFIX}{event.id}",
        "object": "fine_tuning.job.event",
        "created_at": unix(event.created_at),
        "level": _event_level(event, data),
        "message": message,
        "data": data,
        "type": "metrics" if metrics else "message",
    }


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{step}-{job_id}"


def fine_tuning_checkpoint(job: Job, ckpt: Checkpoint) -> dict[str, Any]:
    metrics = {k: v for k, v in (ckpt.metrics or {}).items() if isinstance(v, int | float)}
    return {
        "id": checkpoint_id(job.id, ckpt.step),
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(ckpt.created_at),
        # Not a servable model: a checkpoint is named for `from_checkpoint` of a new job.
        "fine_tuned_model_checkpoint": f"{job.id}:step-{ckpt.step}",
        "fine_tuning_job_id": job.id,
        "metrics": {"step": float(ckpt.step), **metrics},
        "step_number": ckpt.step,
    }


def request_counts(job: Job, total: int) -> dict[str, int]:
    for source in (job.result, job.progress_detail):
        counts = (source or {}).get("request_counts")
        if isinstance(counts, dict):
            return {k: int(counts.get(k, 0)) for k in ("total", "completed", "failed")}
    return {"total": total, "completed": 0, "failed": 0}


def batch(job: Job, total: int) -> dict[str, Any]:
    status = JobStatus(job.status)
    shown = BATCH_STATUS[status]
    if status is JobStatus.RUNNING and job.cancel_requested:
        shown = "cancelling"
    counts = request_counts(job, total)
    done = status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED)
    error = _error(job)
    window = job.spec.get("completion_window", "24h")
    return {
        "id": job.id,
        "object": "batch",
        "endpoint": job.spec["endpoint"],
        "errors": None if error is None else {"object": "list", "data": [{**error, "line": None}]},
        "input_file_id": job.spec["input_dataset"],
        "completion_window": window,
        "status": shown,
        "output_file_id": batch_file_id(job.id, "output") if done and counts["completed"] else None,
        "error_file_id": batch_file_id(job.id, "error") if done and counts["failed"] else None,
        "created_at": unix(job.created_at),
        "in_progress_at": unix(job.started_at),
        "expires_at": unix(job.created_at + completion_window(window)),
        "finalizing_at": None,
        "completed_at": unix(job.finished_at) if status is JobStatus.SUCCEEDED else None,
        "failed_at": unix(job.finished_at) if status is JobStatus.FAILED else None,
        "expired_at": unix(job.finished_at) if status is JobStatus.EXPIRED else None,
        "cancelling_at": None,
        "cancelled_at": unix(job.finished_at) if status is JobStatus.CANCELLED else None,
        "request_counts": counts,
        "metadata": job.metadata_ or None,
    }
