from __future__ import annotations

from enum import StrEnum


class JobKind(StrEnum):
    GENERATE = "generate"
    FINETUNE = "finetune"
    PREDICT = "predict"
    NOOP = "noop"
    BATCH = "batch"
    EMBED = "embed"


class FineTuneTask(StrEnum):
    CAUSAL_LM = "causal_lm"
    SEQUENCE_CLASSIFICATION = "sequence_classification"
    TOKEN_CLASSIFICATION = "token_classification"


class FineTuneMethod(StrEnum):
    FULL = "full"
    LORA = "lora"
    ADALORA = "adalora"


class Tracker(StrEnum):
    """An experiment tracker a fine-tune reports its metrics to, besides our own database."""

    TENSORBOARD = "tensorboard"  # event files in the attempt's directory, downloadable
    MLFLOW = "mlflow"  # a run per attempt on the deployment's MLflow tracking server
    WANDB = "wandb"  # a Weights & Biases run per attempt (online, or offline files)


class FineTuneObjective(StrEnum):
    """What training optimizes (FineTuneMethod says which weights it changes)."""

    SUPERVISED = "supervised"  # next-token (or label) loss on the dataset's rows
    DPO = "dpo"  # direct preference optimization on chosen/rejected pairs (causal_lm only)
    REINFORCEMENT = "reinforcement"  # GRPO: sampled completions scored by a grader (causal_lm)


class DatasetSchema(StrEnum):
    """The shape of a dataset's rows once parsed."""

    TEXT = "text"  # {"text"}
    PROMPT_COMPLETION = "prompt_completion"  # {"prompt", "completion"}
    CHAT = "chat"  # {"messages": [{"role", "content"}]}
    CLASSIFICATION = "classification"  # {"text", "label"}
    PAIR_CLASSIFICATION = "pair_classification"  # {"text", "text_pair", "label"}
    TOKEN_CLASSIFICATION = "token_classification"  # {"tokens": [...], "tags": [...]}
    BATCH_REQUESTS = "batch_requests"  # OpenAI batch input: {"custom_id", "method", "url", "body"}
    PREFERENCE = "preference"  # {"prompt", "chosen", "rejected"}: texts, or message lists
    REINFORCEMENT = "reinforcement"  # {"messages": a prompt ending with a user message, ...fields}


SCHEMAS_FOR_TASK: dict[FineTuneTask, frozenset[DatasetSchema]] = {
    FineTuneTask.CAUSAL_LM: frozenset(
        {DatasetSchema.TEXT, DatasetSchema.PROMPT_COMPLETION, DatasetSchema.CHAT}
    ),
    FineTuneTask.SEQUENCE_CLASSIFICATION: frozenset(
        {DatasetSchema.CLASSIFICATION, DatasetSchema.PAIR_CLASSIFICATION}
    ),
    FineTuneTask.TOKEN_CLASSIFICATION: frozenset({DatasetSchema.TOKEN_CLASSIFICATION}),
}


def training_schemas(task: FineTuneTask, objective: FineTuneObjective) -> frozenset[DatasetSchema]:
    """The dataset schemas a fine-tune of `task` trains on with `objective`."""
    if objective is FineTuneObjective.DPO:
        return frozenset({DatasetSchema.PREFERENCE})
    if objective is FineTuneObjective.REINFORCEMENT:
        return frozenset({DatasetSchema.REINFORCEMENT})
    return SCHEMAS_FOR_TASK[task]


LABELLED_SCHEMAS = frozenset({DatasetSchema.CLASSIFICATION, DatasetSchema.PAIR_CLASSIFICATION})
COMPLETION_SCHEMAS = frozenset({DatasetSchema.PROMPT_COMPLETION, DatasetSchema.CHAT})
"""Schemas whose rows hold a completion to compare a generated one with (exact match)."""
"""Schemas with one class label per row."""


class PredictMode(StrEnum):
    PREDICT = "predict"  # labels (classifier) or entities (tagger) per text
    RANK = "rank"  # candidates scored against a query by a pair classifier, best first


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # past its deadline: a queued job's expires_at, a batch's window
    PAUSED = "paused"  # a fine-tune resting at a checkpoint, holding no worker, until resumed


class EventType(StrEnum):
    STATUS = "status"
    PROGRESS = "progress"
    LOG = "log"
    ERROR = "error"


class WebhookEvent(StrEnum):
    """What a job's webhook can be told about; a job subscribes to a subset."""

    STARTED = "started"
    PROGRESS = "progress"  # throttled: webhook_progress_interval_s
    CHECKPOINT = "checkpoint"
    COMPLETED = "completed"  # any terminal status
    ALERT = "alert"  # a monitor's alert (monitors only; jobs cannot subscribe to it)


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # waiting for its next attempt
    DELIVERED = "delivered"  # a 2xx answer
    FAILED = "failed"  # out of attempts


class FailureType(StrEnum):
    """Typed reason a job failed (or why an attempt ended)."""

    WORKER_LOST = "worker_lost"
    MODEL_NOT_FOUND = "model_not_found"
    INVALID_SPEC = "invalid_spec"
    OUT_OF_MEMORY = "out_of_memory"
    RUNTIME_ERROR = "runtime_error"
    TRANSIENT_ERROR = "transient_error"
    BATCH_EXPIRED = "batch_expired"
    TIMED_OUT = "timed_out"  # ran past its max_runtime_s (or the workers' job_time_limit_s)
    EXPIRED = "expired"  # still queued at its expires_at; never started
    DATABASE_UNAVAILABLE = "database_unavailable"
    BROKER_UNAVAILABLE = "broker_unavailable"
    DISK_FULL = "disk_full"


class BatchEndpoint(StrEnum):
    """The OpenAI endpoints a batch request line may call."""

    COMPLETIONS = "/v1/completions"
    CHAT_COMPLETIONS = "/v1/chat/completions"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"


QUEUE_FOR_KIND: dict[JobKind, str] = {
    JobKind.GENERATE: "generate",
    JobKind.PREDICT: "generate",
    JobKind.NOOP: "generate",
    JobKind.BATCH: "generate",
    JobKind.EMBED: "generate",
    JobKind.FINETUNE: "train",
}
MAINTENANCE_QUEUE = "maintenance"


class MonitorState(StrEnum):
    """A sentiment monitor: `alerting` from an alert until its window recovers."""

    OK = "ok"
    ALERTING = "alerting"
