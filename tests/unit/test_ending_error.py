"""What an OpenAI-shaped request answers for its job's end: the same mapping for chat and
text completions (no `input` field) and embeddings (`input`)."""

from __future__ import annotations

import pytest

from api.errors import error_body, status_for
from api.job_follow import JobState, ending_error
from core.enums import FailureType, JobStatus
from core.errors import (
    BadRequestError,
    JobCancelledError,
    JobFailedError,
    ModelNotFoundError,
    ModelyardError,
)


def failed(error_type: FailureType, message: str = "why") -> JobState:
    return JobState(JobStatus.FAILED, 1, error_type.value, message)


@pytest.mark.parametrize("input_param", [None, "input"])
def test_a_model_the_worker_could_not_find_is_404_naming_model(input_param: str | None) -> None:
    error = ending_error("job_1", failed(FailureType.MODEL_NOT_FOUND, "no such model"), input_param)
    assert isinstance(error, ModelNotFoundError)
    assert (status_for(error), error.param, error.message) == (404, "model", "no such model")


@pytest.mark.parametrize("input_param", [None, "input"])
def test_a_spec_the_worker_refused_is_400_naming_the_input(input_param: str | None) -> None:
    error = ending_error("job_1", failed(FailureType.INVALID_SPEC), input_param)
    assert isinstance(error, BadRequestError)
    assert (status_for(error), error.param) == (400, input_param)


@pytest.mark.parametrize("status", [JobStatus.CANCELLED, JobStatus.EXPIRED])
def test_a_job_cancelled_or_expired_is_a_cancellation(status: JobStatus) -> None:
    error = ending_error("job_1", JobState(status, 1, None, None), None)
    assert isinstance(error, JobCancelledError)
    assert status.value in error.message


@pytest.mark.parametrize(
    "state",
    [None, failed(FailureType.OUT_OF_MEMORY, "too big")],
    ids=["disappeared", "failed"],
)
def test_anything_else_is_the_jobs_failure(state: JobState | None) -> None:
    error = ending_error("job_1", state, "input")
    assert isinstance(error, JobFailedError) and isinstance(error, ModelyardError)
    assert status_for(error) >= 500
    assert "job_1" in error.message
    body = error_body(error.type, error.message, error.param)
    assert body["error"]["message"] == error.message
