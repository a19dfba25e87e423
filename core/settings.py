"""The one settings tree. Nothing else reads os.environ for configuration."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.enums import Tracker


class Settings(BaseSettings):
    """Modelyard configuration, read from `MODELYARD_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="MODELYARD_", extra="ignore")

    data_dir: Path = Field(
        default=Path(".modelyard"),
        description="Directory for the SQLite database, models and artifacts.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means a SQLite file under the data dir.",
    )
    broker_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis URL used by Celery as broker and for the workers' broker leases.",
    )
    database_connect_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="PostgreSQL: longest wait to open a connection, and how long an "
        "unanswered connection may stay open (TCP user timeout and keepalives) before it "
        "counts as lost, so a database that drops packets fails writers within this long.",
    )
    database_statement_timeout_s: float = Field(
        default=120.0,
        ge=0,
        description="PostgreSQL: longest a statement may run before the server cancels it "
        "(0: no limit).",
    )
    database_idle_in_transaction_s: float = Field(
        default=30.0,
        ge=0,
        description="PostgreSQL: the server ends a session left idle inside a transaction "
        "this long (a process paused or cut off mid-transaction), so the row locks it held "
        "(a lease row, a job row) do not block every other process (0: never).",
    )
    lease_ttl_s: float = Field(
        default=60.0, gt=0, description="How long a worker's claim on a job lasts unrenewed."
    )
    heartbeat_interval_s: float = Field(
        default=5.0, gt=0, description="How often a running job renews its lease and reads cancel."
    )
    reconcile_period_s: float = Field(
        default=30.0,
        gt=0,
        description="How often the recovery leader (a worker or beat holding the recovery "
        "lease) runs the reconciler; a dead leader is replaced within one period.",
    )
    retry_poll_s: float = Field(
        default=1.0,
        gt=0,
        description="How often the recovery leader publishes retries whose backoff ended.",
    )
    recovery_in_workers: bool = Field(
        default=True,
        description="Workers run for the recovery lease too (reconciler, webhook sender, due "
        "retries), not only beat processes; off: only `modelyard beat` processes do.",
    )
    republish_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="Age a queued job must reach before the reconciler republishes it.",
    )
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Default attempts before a job fails."
    )
    retry_backoff_s: float = Field(
        default=5.0, ge=0, description="First retry delay after a transient error; doubles."
    )
    retry_backoff_max_s: float = Field(default=300.0, ge=0, description="Cap on retry delay.")
    retry_jitter: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Each retry delay is shortened by a random fraction up to this, so jobs "
        "that failed together (a database restart) do not all retry at the same moment.",
    )
    retry_out_of_memory: bool = Field(
        default=False,
        description="Retry a job that ran out of memory (with backoff, up to max_attempts) "
        "instead of failing it once: for devices shared with other processes.",
    )
    stop_grace_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a running job may take to stop after its run time limit or a "
        "lost lease; past it the worker records the outcome and restarts its process in place "
        "(a prefork child exits and is replaced), so a runner that ignores its stop flag "
        "cannot hold the worker.",
    )
    job_time_limit_s: float = Field(
        default=86_400.0,
        gt=0,
        description="Longest a job attempt may run; a job's max_runtime_s may set less. At the "
        "limit the job checkpoints and fails with timed_out.",
    )
    broker_visibility_timeout_s: float = Field(
        default=172_800.0,
        gt=0,
        description="Seconds Redis waits for a message's acknowledgement before it delivers "
        "it again. A worker refuses to start unless it exceeds job_time_limit_s.",
    )
    broker_reconnect_max_s: float = Field(
        default=2.0,
        gt=0,
        le=30,
        description="Longest a worker waits between tries to reach the broker again after "
        "losing it, so it consumes again within this long of the broker coming back.",
    )
    db_retry_s: float = Field(
        default=300.0,
        ge=0,
        description="How long a worker keeps retrying writes it must not drop (buffered "
        "metrics, a job's final status) while the database is unreachable.",
    )
    worker_stall_s: float = Field(
        default=120.0,
        gt=0,
        description="An idle worker that received nothing for this long while due jobs waited "
        "this long on its queues is reported as stalled by `modelyard workers --check`.",
    )
    batch_chunk_lines: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Batch lines handed to the generation engine at once; progress and the "
        "completion window are checked between chunks.",
    )
    device: str = Field(
        default="auto", description="`auto` (CUDA when available, else CPU), `cpu` or `cuda[:N]`."
    )
    training_procs: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Processes one fine-tune trains in (with two or more, torchrun starts them: "
        "DDP over gloo on CPU, NCCL on GPUs); training never runs in the worker process "
        "itself. `modelyard worker --procs N` sets it; `--gpus 0,1` sets it to the GPUs named.",
    )
    tracking: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers every fine-tune reports to unless its spec names its "
        "own (`tracking`), as JSON: `MODELYARD_TRACKING='[\"tensorboard\"]'`. Off by default.",
    )
    mlflow_tracking_uri: SecretStr = Field(
        default=SecretStr(""),
        description="The MLflow tracking server fine-tunes with the `mlflow` tracker report "
        "to (it may carry credentials: kept out of logs and results).",
    )
    mlflow_experiment: str = Field(
        default="modelyard", min_length=1, description="The MLflow experiment their runs go to."
    )
    wandb_project: str = Field(
        default="modelyard", min_length=1, description="The W&B project fine-tune runs go to."
    )
    wandb_mode: Literal["online", "offline"] = Field(
        default="online",
        description="`offline`: W&B runs are files in the attempt's directory (`wandb sync` "
        "uploads them later); `online`: sent to W&B as they run.",
    )
    wandb_api_key: SecretStr = Field(
        default=SecretStr(""), description="The W&B API key of online runs (kept out of logs)."
    )
    max_body_bytes: int = Field(
        default=1_048_576, gt=0, description="Largest request body the API accepts."
    )
    max_upload_bytes: int = Field(
        default=100 * 1024 * 1024,
        gt=0,
        description="Largest dataset upload (POST /v1/datasets) the API accepts; "
        "it replaces max_body_bytes for that route and is checked while the body streams in.",
    )
    auto_migrate: bool = Field(
        default=True, description="Run `alembic upgrade head` when the API starts."
    )
    generation_max_sequences: int = Field(
        default=32,
        ge=1,
        le=1024,
        validation_alias=AliasChoices(
            "generation_max_sequences",
            "MODELYARD_GENERATION_MAX_SEQUENCES",
            "MODELYARD_GENERATION_MAX_BATCH",
        ),
        description="Most sequences a worker decodes together (its decode group). "
        "MODELYARD_GENERATION_MAX_BATCH is the older name.",
    )
    generation_prefill_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Most prompt tokens (padded: sequences x longest prompt) a decode group "
        "prefills in one step; the rest join at the next steps, so a burst of new requests "
        "does not hold up every first token, nor the sequences already decoding, behind one "
        "long prefill (chunked admission, like vLLM's max_num_batched_tokens). Unset: 512 on "
        "a CPU, 8192 on a GPU. At least one sequence is admitted per step whatever its length.",
    )
    generation_group_wait_s: float = Field(
        default=0.02,
        ge=0,
        le=5,
        validation_alias=AliasChoices(
            "generation_group_wait_s",
            "MODELYARD_GENERATION_GROUP_WAIT_S",
            "MODELYARD_GENERATION_BATCH_WAIT_S",
        ),
        description="How long a worker waits for more ready generation jobs to join its "
        "decode group before the first step. MODELYARD_GENERATION_BATCH_WAIT_S is the older "
        "name.",
    )
    generation_poll_s: float = Field(
        default=0.05,
        gt=0,
        le=10,
        description="How often a decoding worker looks for ready jobs to join its decode group.",
    )
    generation_join_window_s: float = Field(
        default=60.0,
        gt=0,
        description="A decode group takes in newly ready jobs for this long, then drains, so the "
        "worker goes back to its queue (other job kinds) instead of decoding forever.",
    )
    embedding_batch_size: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Most inputs (of any number of embedding jobs) in one padded encoder pass.",
    )
    embedding_max_jobs: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="Most embedding jobs on one model a worker claims to encode together.",
    )
    embedding_batch_wait_s: float = Field(
        default=0.005,
        ge=0,
        le=5,
        description="How long a worker that claimed an embedding job waits for more ready jobs "
        "on the same model before it encodes (requests sent together share passes).",
    )
    serving_store_text: bool = Field(
        default=True,
        description="Whether /v1/chat/completions and /v1/completions keep the generated text "
        "in the database (a request's OpenAI `store` field decides for itself). Without it the "
        "answer reaches the client from the token stream only, and an Idempotency-Key retry "
        "cannot replay it.",
    )
    create_concurrency: int = Field(
        default=4,
        ge=1,
        le=64,
        description="How many jobs one API process creates at once (/v1/jobs, chat and text "
        "completions, embeddings). A burst's jobs are then created a few at a time, the first "
        "ready for a worker within milliseconds, instead of all finishing together at the end "
        "of the burst, interleaved in the thread pool and queued on the database's write lock "
        "(bench/README.md, P1 and P6).",
    )
    chat_default_max_tokens: int = Field(
        default=1024,
        ge=1,
        le=4096,
        description="Most new tokens of a /v1/chat/completions answer (or a batch's chat "
        "line) that sets neither max_completion_tokens nor max_tokens, cut to what the "
        "model's context leaves after the prompt (it may end sooner, at the model's end of "
        "text).",
    )
    model_cache_mb: int = Field(
        default=8192, ge=1, description="Memory budget of each worker's loaded-model cache (MiB)."
    )
    api_host: str = Field(default="127.0.0.1", description="Address `modelyard api` binds.")
    api_port: int = Field(default=8000, ge=1, le=65535, description="Port `modelyard api` binds.")
    api_workers: int = Field(
        default=1, ge=1, le=64, description="API server processes (`modelyard api`)."
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`json`: one JSON object per log line, with job_id and tenant fields.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of every Modelyard process."
    )

    storage_url: str = Field(
        default="",
        description="Shared storage for datasets, models and checkpoints when hosts do not "
        "share the data dir: an fsspec URL such as s3://bucket/modelyard (S3-compatible, "
        "`pip install modelyard[s3]`) or file:///mnt/shared. Every process keeps a local "
        "copy under its data dir. Empty: the data dir is the only copy (one host, or a "
        "shared mount).",
    )
    storage_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description='fsspec options as JSON, e.g. {"endpoint_url": "http://minio:9000"}; '
        "put credentials in the provider's own variables (AWS_ACCESS_KEY_ID, ...).",
    )

    flower_host: str = Field(
        default="127.0.0.1", description="Address `modelyard flower` binds (loopback by default)."
    )
    flower_port: int = Field(default=5555, ge=1, le=65535, description="Flower's port.")
    flower_user: str | None = Field(
        default=None, description="Flower basic-auth user; `modelyard flower` needs one."
    )
    flower_password: SecretStr | None = Field(
        default=None,
        description="Flower basic-auth password (at least 12 characters); never logged.",
    )
    flower_url: str = Field(
        default="http://127.0.0.1:5555",
        pattern=r"^https?://",
        description="Where people reach Flower; the dashboard at /ui links to it.",
    )
    webhook_allowed_destinations: list[str] = Field(
        default_factory=list,
        description="Networks (CIDR) or host names webhooks may reach although they resolve "
        'to loopback, private, link-local or metadata addresses, e.g. ["127.0.0.1/32"]. '
        "Everything else must resolve to public addresses only.",
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, le=60, description="Time limit of one webhook delivery attempt."
    )
    webhook_max_attempts: int = Field(
        default=12,
        ge=1,
        le=50,
        description="Attempts per delivery before it is marked failed (retried with "
        "exponential backoff and jitter; with the defaults, over about 5 hours).",
    )
    webhook_backoff_s: float = Field(
        default=30.0,
        gt=0,
        description="Wait before the second attempt; each later wait doubles, up to an hour, "
        "with +-20% jitter.",
    )
    webhook_progress_interval_s: float = Field(
        default=30.0,
        ge=0,
        description="At most one `progress` delivery per job in this many seconds.",
    )
    webhook_poll_s: float = Field(
        default=1.0,
        gt=0,
        description="How often the recovery leader starts attempts for due webhook deliveries.",
    )
    hub_downloads: bool = Field(
        default=False,
        description="Models not installed under the data dir may be downloaded from the "
        "Hugging Face hub, when their repository is in hub_allowed_models. Off: a model "
        "that is not installed fails at once, naming it.",
    )
    hub_allowed_models: list[str] = Field(
        default_factory=list,
        description="Hub repositories that may be downloaded with hub_downloads on: exact ids "
        '("org/name"), whole organisations ("org/*"), or "*" for any.',
    )
    metrics_job_labels: bool = Field(
        default=False,
        description="/metrics labels per-job series (running fine-tunes' throughput) with "
        "their job id and tenant; off: one unlabelled total.",
    )
    metrics_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="/metrics answers from a copy at most this old, so scrapes (from any "
        "number of scrapers) query the database at most once per period (0: every scrape).",
    )
    metrics_history_refresh_s: float = Field(
        default=60.0,
        ge=0,
        description="/metrics figures that scan the whole job history (wait and run time "
        "histograms, generated tokens, failed webhook attempts) are read at most this often.",
    )
    webhook_dns_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="Time limit of a webhook destination's DNS look-up."
    )
    webhook_per_destination: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Attempts in flight at once to one destination (host and port), so one "
        "slow endpoint holds up only its own deliveries.",
    )
    webhook_secret_overlap_s: float = Field(
        default=86_400.0,
        ge=0,
        description="After a signing secret is rotated, deliveries are signed with the old "
        "one too for this long, so receivers can switch without dropping any.",
    )

    auth_disabled: bool = Field(
        default=False,
        description="Development only: serve /v1 without API keys, as the `default` tenant "
        "with every scope. Logged as a warning at start and reported by /readyz.",
    )
    requests_per_minute: int = Field(
        default=600,
        ge=1,
        description="Requests per minute per API key (sliding window in the broker's Redis); "
        "a tenant's own limit overrides it. Beyond it: 429 with Retry-After.",
    )
    api_key_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="An API server process remembers a key it looked up (tenant, scopes, "
        "rate limit) for this long, so a burst of requests looks it up once. A key revoked "
        "through the API stops working at once in the process that revoked it, and within "
        "this period in other API processes and after `modelyard keys revoke` (0: look the "
        "key up on every request).",
    )
    max_queued_jobs: int = Field(
        default=1000,
        ge=1,
        description="Most queued jobs per tenant; a tenant's own limit overrides it. "
        "Beyond it a new job is refused with 429.",
    )
    max_running_jobs: int | None = Field(
        default=None,
        ge=1,
        description="Most running jobs per tenant (None: no cap); a tenant's own limit "
        "overrides it. Further jobs stay queued until one of the tenant's jobs ends.",
    )
    max_dataset_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Largest dataset a tenant may upload (None: max_upload_bytes); a "
        "tenant's own limit overrides it. Beyond it: 413.",
    )
    max_json_depth: int = Field(
        default=32, ge=2, le=1000, description="Deepest nesting of a JSON request body."
    )
    max_json_items: int = Field(
        default=10_000,
        ge=1,
        description="Most elements of any one JSON array or object in a request body.",
    )

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'modelyard.db').resolve()}"
        return self

    @model_validator(mode="after")
    def _mlflow_needs_a_server(self) -> Settings:
        if Tracker.MLFLOW in self.tracking and not self.mlflow_tracking_uri.get_secret_value():
            raise ValueError("tracking names mlflow: set MODELYARD_MLFLOW_TRACKING_URI too")
        return self

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


@lru_cache
def get_settings() -> Settings:
    return Settings()
