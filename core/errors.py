"""One error hierarchy. api/errors.py maps it to HTTP; workers map it to job failures."""

from __future__ import annotations

from core.enums import FailureType


class ModelyardError(Exception):
    """Base of every error Modelyard raises on purpose."""

    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(ModelyardError):
    """Raised when a request is well-formed JSON but fails validation."""

    type = "invalid_request"


class ModelNotInstalledError(InvalidRequestError):
    """Raised at submit when a model is neither installed, registered, nor an allowed hub repo."""

    type = "model_not_installed"


class DatasetFormatError(InvalidRequestError):
    """Raised when an uploaded dataset file is broken; the message starts with its line."""

    type = "invalid_dataset"

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}", param="file")
        self.line = line


class BatchLineError(ModelyardError):
    """Raised when one batch line cannot run: it becomes that line's error, not the job's."""

    type = "invalid_request"


class WebhookDestinationError(InvalidRequestError):
    """Raised when a webhook_url is not http(s) or resolves to a non-public address."""

    type = "invalid_webhook_url"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="webhook_url")


class BadRequestError(ModelyardError):
    """Raised when a request to an OpenAI-compatible serving route is invalid (OpenAI: 400)."""

    type = "invalid_request_error"


class UnsupportedParameterError(BadRequestError):
    """Raised when an OpenAI-compatible request sets a parameter this server does not honour."""

    type = "unsupported_parameter"


class ContextLengthExceededError(BadRequestError):
    """Raised when a serving request's prompt (and its max tokens) exceeds the model's context."""

    type = "context_length_exceeded"


class StorageError(ModelyardError):
    """Raised when an artifact path lies outside the data dir (shared storage, core/storage.py)."""

    type = "storage_error"


class MalformedBodyError(ModelyardError):
    """Raised when a request body is not parseable JSON."""

    type = "invalid_json"


class PayloadTooLargeError(ModelyardError):
    """Raised when a request body exceeds the configured size limit."""

    type = "payload_too_large"


class NotFoundError(ModelyardError):
    """Raised when a resource id does not exist (or is not visible to the caller)."""

    type = "not_found"


class ModelNotFoundError(NotFoundError):
    """Raised when a serving request names a model that is not installed or registered."""

    type = "model_not_found"


class JobCancelledError(ModelyardError):
    """Raised when a serving request's job was cancelled before it answered."""

    type = "job_cancelled"


class JobFailedError(ModelyardError):
    """Raised when a serving request's job failed; the message carries the job's error."""

    type = "server_error"


class AuthenticationError(ModelyardError):
    """Raised when a request has no API key, or one that is unknown or revoked."""

    type = "authentication_error"


class PermissionDeniedError(ModelyardError):
    """Raised when a valid API key lacks the scope a route needs."""

    type = "permission_denied"


class RateLimitedError(ModelyardError):
    """Raised when an API key made more requests this minute than its tenant allows."""

    type = "rate_limited"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QuotaExceededError(ModelyardError):
    """Raised when a tenant already has as many queued jobs as its quota allows."""

    type = "quota_exceeded"


class IdempotencyConflictError(ModelyardError):
    """Raised when an Idempotency-Key is reused with a different request body."""

    type = "idempotency_conflict"


class InvalidStateError(ModelyardError):
    """Raised when an action is not allowed in the job's current status."""

    type = "invalid_state"


class ServiceUnavailableError(ModelyardError):
    """Raised when the database or broker cannot be reached."""

    type = "service_unavailable"


class ConfigurationError(ModelyardError):
    """Raised at start when settings contradict each other; the process refuses to run."""

    type = "configuration_error"


class JobError(ModelyardError):
    """Base of errors a runner raises to end a job attempt."""

    failure: FailureType = FailureType.RUNTIME_ERROR


class PermanentJobError(JobError):
    """Raised when retrying cannot help; the job fails once with a typed reason."""

    def __init__(self, message: str, failure: FailureType) -> None:
        super().__init__(message)
        self.failure = failure


class TransientJobError(JobError):
    """Raised for a named temporary condition; the job is queued again with backoff."""

    def __init__(self, message: str, failure: FailureType = FailureType.TRANSIENT_ERROR) -> None:
        super().__init__(message)
        self.failure = failure


class JobStopped(JobError):
    """Raised inside a runner when the job was cancelled or its lease was lost."""


class JobExpired(JobStopped):
    """Raised by a runner that already recorded its job as expired (deadline passed)."""


class StaleAttempt(JobStopped):
    """Raised when a write of a running attempt is refused: a newer attempt holds the job."""
