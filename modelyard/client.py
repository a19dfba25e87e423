"""A small synchronous client for the Modelyard HTTP API."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})


class ModelyardAPIError(Exception):
    """An error response from the API, built from its `{"error": ...}` body."""

    def __init__(self, status_code: int, type_: str, message: str, param: str | None) -> None:
        super().__init__(f"{status_code} {type_}: {message}")
        self.status_code = status_code
        self.type = type_
        self.message = message
        self.param = param


class Client:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        merged = dict(headers or {})
        if api_key:
            merged["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=merged)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            try:
                err = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"type": "http_error", "message": response.text, "param": None}
            raise ModelyardAPIError(
                response.status_code, err.get("type", ""), err.get("message", ""), err.get("param")
            )
        return response.json()

    def ready(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/readyz")
        return result

    def submit(
        self,
        kind: str,
        spec: dict[str, Any],
        *,
        priority: int = 0,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body = {"kind": kind, "spec": spec, "priority": priority, "metadata": metadata or {}}
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        job: dict[str, Any] = self._request("POST", "/v1/jobs", json=body, headers=headers)
        return job

    def list_jobs(self, **filters: Any) -> dict[str, Any]:
        """One page of jobs, newest first: `status`, `kind`, `limit`, `cursor`, ..."""
        page: dict[str, Any] = self._request("GET", "/v1/jobs", params=filters)
        return page

    def get(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._request("GET", f"/v1/jobs/{job_id}")
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._request("POST", f"/v1/jobs/{job_id}/cancel")
        return job

    def outputs(self, job_id: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request("GET", f"/v1/jobs/{job_id}/outputs")["data"]
        return data

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request(
            "GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 500}
        )["data"]
        return data

    def upload_dataset(self, path: str | Path, *, name: str | None = None) -> dict[str, Any]:
        file_path = Path(path)
        with file_path.open("rb") as fh:
            files = {"file": (name or file_path.name, fh)}
            dataset: dict[str, Any] = self._request("POST", "/v1/datasets", files=files)
        return dataset

    def metrics(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request(
            "GET", f"/v1/jobs/{job_id}/metrics", params={"after": after}
        )["data"]
        return data

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request("GET", f"/v1/jobs/{job_id}/checkpoints")["data"]
        return data

    def model(self, name: str) -> dict[str, Any]:
        model: dict[str, Any] = self._request("GET", f"/v1/models/{name}")
        return model

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
