"""A synchronous client for the Modelyard HTTP API (httpx).

Errors come back as typed exceptions built from the API's `{"error": ...}` body. Calls
that are safe to repeat (reads, and job submission, which always carries an
Idempotency-Key) are retried on connection errors and 503s with backoff.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})
RETRIES = 3
RETRY_BASE_S = 0.5


class ModelyardAPIError(Exception):
    """An error response from the API, built from its `{"error": ...}` body."""

    def __init__(
        self,
        status_code: int,
        type_: str,
        message: str,
        param: str | None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status_code} {type_}: {message}")
        self.status_code = status_code
        self.type = type_
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidRequestError(ModelyardAPIError):
    """400 or 422: the request was refused and changed nothing."""


class AuthenticationError(ModelyardAPIError):
    """401: no key, an unknown key or a revoked one."""


class PermissionDeniedError(ModelyardAPIError):
    """403: the key lacks the scope this call needs."""


class NotFoundError(ModelyardAPIError):
    """404: no such resource (or not yours)."""


class ConflictError(ModelyardAPIError):
    """409: not allowed in the resource's state, or an Idempotency-Key reused."""


class PayloadTooLargeError(ModelyardAPIError):
    """413: the body is over the limit."""


class RateLimitError(ModelyardAPIError):
    """429: slow down; `retry_after` says for how long."""


class ServiceUnavailableError(ModelyardAPIError):
    """503: the database or broker is unreachable; retry later."""


ERROR_FOR_STATUS: dict[int, type[ModelyardAPIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: InvalidRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_from(response: httpx.Response) -> ModelyardAPIError:
    try:
        err = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        err = {"type": "http_error", "message": response.text, "param": None}
    try:
        retry_after = float(response.headers["retry-after"])
    except (KeyError, ValueError):
        retry_after = None
    cls = ERROR_FOR_STATUS.get(response.status_code, ModelyardAPIError)
    return cls(
        response.status_code,
        err.get("type", ""),
        err.get("message", ""),
        err.get("param"),
        retry_after,
    )


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-sent events as {"event", "id", "data"} (data JSON-decoded); comments skipped."""
    current: dict[str, Any] = {}
    for line in lines:
        if not line:
            if current:
                yield current
            current = {}
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            current["data"] = json.loads(value)
        elif field in ("event", "id"):
            current[field] = value
    if current:
        yield current


class Client:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        retries: int = RETRIES,
    ) -> None:
        merged = dict(headers or {})
        if api_key is None:
            # The SDK runs in the caller's programs, not the server: like other API clients
            # it falls back to the environment for its key.
            api_key = os.environ.get("MODELYARD_API_KEY") or None
        if api_key:
            merged["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=merged)
        self._retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, retry: bool | None = None, **kwargs: Any) -> Any:
        """One call; reads (and calls the caller marks safe) are retried on connection
        errors and 503s. Answers with no body come back as None."""
        safe = method == "GET" if retry is None else retry
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if not safe or attempt > self._retries:
                    raise
                time.sleep(RETRY_BASE_S * 2 ** (attempt - 1))
                continue
            if response.status_code == 503 and safe and attempt <= self._retries:
                time.sleep(RETRY_BASE_S * 2 ** (attempt - 1))
                continue
            if response.is_error:
                raise error_from(response)
            return response.json() if response.content else None

    def ready(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/readyz")
        return result

    # Jobs

    def submit(
        self,
        kind: str,
        spec: dict[str, Any],
        *,
        priority: int = 0,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Create a job. `options` are the other body fields (webhook_url, webhook_events,
        expires_at, max_runtime_s, max_attempts). Always sends an Idempotency-Key, so a
        retried submit never creates a second job."""
        body = {"kind": kind, "spec": spec, "priority": priority, "metadata": metadata or {}}
        body.update(options)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        job: dict[str, Any] = self._request(
            "POST", "/v1/jobs", json=body, headers=headers, retry=True
        )
        return job

    def list_jobs(self, **filters: Any) -> dict[str, Any]:
        """One page of jobs, newest first: `status`, `kind`, `limit`, `cursor`, ..."""
        page: dict[str, Any] = self._request("GET", "/v1/jobs", params=filters)
        return page

    def iter_jobs(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every job matching `filters`, newest first, page by page."""
        params = dict(filters)
        while True:
            page = self.list_jobs(**params)
            yield from page["data"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def get(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._request("GET", f"/v1/jobs/{job_id}")
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._request("POST", f"/v1/jobs/{job_id}/cancel", retry=True)
        return job

    def pause(self, job_id: str) -> dict[str, Any]:
        """Pause a fine-tune: it checkpoints, then rests `paused` until resumed."""
        job: dict[str, Any] = self._request("POST", f"/v1/jobs/{job_id}/pause", retry=True)
        return job

    def resume(self, job_id: str) -> dict[str, Any]:
        """Queue a paused fine-tune again; it continues from its latest checkpoint."""
        job: dict[str, Any] = self._request("POST", f"/v1/jobs/{job_id}/resume", retry=True)
        return job

    def outputs(self, job_id: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request("GET", f"/v1/jobs/{job_id}/outputs")["data"]
        return data

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request(
            "GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 500}
        )["data"]
        return data

    def iter_events(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """The job's events as they happen (server-sent events), until it ends. A dropped
        connection is resumed after the last event received (Last-Event-ID)."""
        last = after
        failures = 0
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events/stream",
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=None),
                ) as response:
                    if response.is_error:
                        response.read()
                        raise error_from(response)
                    for message in parse_sse(response.iter_lines()):
                        if message.get("event") == "end":
                            return
                        last = int(message["id"])
                        failures = 0
                        yield message["data"]
            except httpx.TransportError:
                failures += 1
                if failures > self._retries:
                    raise
                time.sleep(RETRY_BASE_S * 2 ** (failures - 1))

    def stream_tokens(self, job_id: str) -> Iterator[dict[str, Any]]:
        """A generation job's `token` / `restart` / `done` server-sent events."""
        with self._http.stream(
            "GET", f"/v1/jobs/{job_id}/stream", timeout=httpx.Timeout(30.0, read=None)
        ) as response:
            if response.is_error:
                response.read()
                raise error_from(response)
            yield from parse_sse(response.iter_lines())

    def metrics(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request(
            "GET", f"/v1/jobs/{job_id}/metrics", params={"after": after}
        )["data"]
        return data

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request("GET", f"/v1/jobs/{job_id}/checkpoints")["data"]
        return data

    def batch_file(self, job_id: str, name: str = "output") -> str:
        """A batch job's `output` or `error` JSONL."""
        response = self._http.get(f"/v1/jobs/{job_id}/files/{name}")
        if response.is_error:
            raise error_from(response)
        return response.text

    def wait(
        self,
        job_id: str,
        timeout: float = 600.0,
        *,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll with backoff until the job ends; TimeoutError if it doesn't in time."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL_STATUSES:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    # Datasets and models

    def upload_dataset(self, path: str | Path, *, name: str | None = None) -> dict[str, Any]:
        file_path = Path(path)
        with file_path.open("rb") as fh:
            files = {"file": (name or file_path.name, fh)}
            dataset: dict[str, Any] = self._request("POST", "/v1/datasets", files=files)
        return dataset

    def datasets(self, **filters: Any) -> dict[str, Any]:
        page: dict[str, Any] = self._request("GET", "/v1/datasets", params=filters)
        return page

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._request("GET", f"/v1/datasets/{dataset_id}")
        return found

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{dataset_id}", retry=True)

    def models(self, **filters: Any) -> dict[str, Any]:
        page: dict[str, Any] = self._request("GET", "/v1/models", params=filters)
        return page

    def model(self, name: str) -> dict[str, Any]:
        model: dict[str, Any] = self._request("GET", f"/v1/models/{name}")
        return model

    def delete_model(self, name: str) -> dict[str, Any]:
        """`{"id", "object": "model", "deleted": true}`."""
        deleted: dict[str, Any] = self._request("DELETE", f"/v1/models/{name}", retry=True)
        return deleted

    # Webhooks

    def rotate_webhook_secret(self) -> dict[str, Any]:
        """A new signing secret (shown only in this answer)."""
        created: dict[str, Any] = self._request("POST", "/v1/webhooks/secret")
        return created

    def webhook_deliveries(self, **filters: Any) -> dict[str, Any]:
        page: dict[str, Any] = self._request("GET", "/v1/webhooks/deliveries", params=filters)
        return page

    def webhook_delivery(self, delivery_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._request("GET", f"/v1/webhooks/deliveries/{delivery_id}")
        return found

    def redeliver(self, delivery_id: str) -> dict[str, Any]:
        again: dict[str, Any] = self._request(
            "POST", f"/v1/webhooks/deliveries/{delivery_id}/redeliver", retry=True
        )
        return again
