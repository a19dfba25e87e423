"""Clients for the Modelyard HTTP API (httpx): `Client` (blocking) and `AsyncClient`.

Both offer the same resources: the one-request calls are written once in `_Resources`,
and each client runs them with its own transport. Errors come back as typed exceptions
built from the API's `{"error": ...}` body. Calls that are safe to repeat (reads, and
job submission, which always carries an Idempotency-Key) are retried on connection
errors and 503s with backoff.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

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


class JobFailedError(Exception):
    """A job waited on by `run` ended other than succeeded."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job {job['id']} ended {job['status']}: {job.get('error')}")
        self.job = job


def rank_spec(
    model: str, query: str, candidates: list[str], top_k: int | None, label: str | None
) -> dict[str, Any]:
    """A predict spec in `rank` mode: `candidates` scored against `query`."""
    spec: dict[str, Any] = {"model": model, "mode": "rank", "query": query}
    spec["candidates"] = candidates
    if top_k is not None:
        spec["top_k"] = top_k
    if label is not None:
        spec["label"] = label
    return spec


def _succeeded(job: dict[str, Any]) -> dict[str, Any]:
    if job["status"] != "succeeded":
        raise JobFailedError(job)
    return job


class _Poll:
    """`wait`'s schedule: delays growing 1.5x from 0.1 s to 2 s, up to `timeout`."""

    def __init__(
        self,
        job_id: str,
        timeout: float,
        on_update: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self._job_id, self._timeout, self._on_update = job_id, timeout, on_update
        self._deadline = time.monotonic() + timeout
        self._delay = 0.1

    def ended(self, job: dict[str, Any]) -> bool:
        """True once the job is final; TimeoutError when time is up before that."""
        if self._on_update is not None:
            self._on_update(job)
        if job["status"] in TERMINAL_STATUSES:
            return True
        if time.monotonic() >= self._deadline:
            raise TimeoutError(f"job {self._job_id} still {job['status']} after {self._timeout}s")
        return False

    def next_delay(self) -> float:
        delay, self._delay = self._delay, min(self._delay * 1.5, 2.0)
        return delay


class SSEParser:
    """Server-sent events, fed a line at a time, as {"event", "id", "data"} (data
    JSON-decoded); comments skipped. One parser serves the blocking and async streams."""

    def __init__(self) -> None:
        self._current: dict[str, Any] = {}

    def feed(self, line: str) -> dict[str, Any] | None:
        """The message a blank line completes, else None."""
        if not line:
            done, self._current = self._current, {}
            return done or None
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._current["data"] = json.loads(value)
        elif field in ("event", "id"):
            self._current[field] = value
        return None

    def flush(self) -> dict[str, Any] | None:
        return self.feed("")


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-sent events from lines of text (see SSEParser)."""
    parser = SSEParser()
    for line in lines:
        message = parser.feed(line)
        if message is not None:
            yield message
    last = parser.flush()
    if last is not None:
        yield last


def _auth_headers(api_key: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    merged = dict(headers or {})
    if api_key is None:
        # The SDK runs in the caller's programs, not the server: like other API clients
        # it falls back to the environment for its key.
        api_key = os.environ.get("MODELYARD_API_KEY") or None
    if api_key:
        merged["Authorization"] = f"Bearer {api_key}"
    return merged


def _backoff_s(attempt: int) -> float:
    return float(RETRY_BASE_S * 2 ** (attempt - 1))


def _should_retry(safe: bool, attempt: int, retries: int, status_code: int | None) -> bool:
    """Whether a failed attempt (a transport error when status_code is None) is tried again."""
    if not safe or attempt > retries:
        return False
    return status_code is None or status_code == 503


Body = Literal["json", "text", "bytes"]  # how an answer's body is decoded


def _answer(response: httpx.Response, pick: str | None, body: Body) -> Any:
    if response.is_error:
        raise error_from(response)
    if body == "text":
        return response.text
    if body == "bytes":
        return response.content
    if not response.content:
        return None
    data = response.json()
    return data[pick] if pick else data


SSE_TIMEOUT = httpx.Timeout(30.0, read=None)
R = TypeVar("R")


class _Resources(Generic[R]):
    """Every call that is one HTTP request, written once. `_request` returns the decoded
    answer (blocking client) or an awaitable of it (async client)."""

    def _request(
        self,
        method: str,
        path: str,
        *,
        retry: bool | None = None,
        pick: str | None = None,
        body: Body = "json",
        **kwargs: Any,
    ) -> R:
        raise NotImplementedError

    def ready(self) -> R:
        return self._request("GET", "/readyz")

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
    ) -> R:
        """Create a job. `options` are the other body fields (webhook_url, webhook_events,
        expires_at, max_runtime_s, max_attempts). Always sends an Idempotency-Key, so a
        retried submit never creates a second job."""
        body = {"kind": kind, "spec": spec, "priority": priority, "metadata": metadata or {}}
        body.update(options)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return self._request("POST", "/v1/jobs", json=body, headers=headers, retry=True)

    def list_jobs(self, **filters: Any) -> R:
        """One page of jobs, newest first: `status`, `kind`, `limit`, `cursor`, ..."""
        return self._request("GET", "/v1/jobs", params=filters)

    def get(self, job_id: str) -> R:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> R:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel", retry=True)

    def pause(self, job_id: str) -> R:
        """Pause a fine-tune: it checkpoints, then rests `paused` until resumed."""
        return self._request("POST", f"/v1/jobs/{job_id}/pause", retry=True)

    def resume(self, job_id: str) -> R:
        """Queue a paused fine-tune again; it continues from its latest checkpoint."""
        return self._request("POST", f"/v1/jobs/{job_id}/resume", retry=True)

    def outputs(self, job_id: str) -> R:
        return self._request("GET", f"/v1/jobs/{job_id}/outputs", pick="data")

    def events(self, job_id: str, after: int = 0) -> R:
        params = {"after": after, "limit": 500}
        return self._request("GET", f"/v1/jobs/{job_id}/events", params=params, pick="data")

    def metrics(self, job_id: str, after: int = 0) -> R:
        params = {"after": after}
        return self._request("GET", f"/v1/jobs/{job_id}/metrics", params=params, pick="data")

    def checkpoints(self, job_id: str) -> R:
        return self._request("GET", f"/v1/jobs/{job_id}/checkpoints", pick="data")

    def batch_file(self, job_id: str, name: str = "output") -> R:
        """A batch job's `output` or `error` JSONL."""
        return self._request("GET", f"/v1/jobs/{job_id}/files/{name}", body="text")

    def tensorboard(self, job_id: str) -> R:
        """A fine-tune's TensorBoard event files, one run per attempt, as .tar.gz bytes."""
        return self._request("GET", f"/v1/jobs/{job_id}/tensorboard", body="bytes")

    # Datasets and models

    def upload_dataset(self, path: str | Path, *, name: str | None = None) -> R:
        file_path = Path(path)
        files = {"file": (name or file_path.name, file_path.read_bytes())}
        return self._request("POST", "/v1/datasets", files=files)

    def datasets(self, **filters: Any) -> R:
        return self._request("GET", "/v1/datasets", params=filters)

    def dataset(self, dataset_id: str) -> R:
        return self._request("GET", f"/v1/datasets/{dataset_id}")

    def delete_dataset(self, dataset_id: str) -> R:
        return self._request("DELETE", f"/v1/datasets/{dataset_id}", retry=True)

    def models(self, **filters: Any) -> R:
        return self._request("GET", "/v1/models", params=filters)

    def model(self, name: str) -> R:
        return self._request("GET", f"/v1/models/{name}")

    def delete_model(self, name: str) -> R:
        """`{"id", "object": "model", "deleted": true}`."""
        return self._request("DELETE", f"/v1/models/{name}", retry=True)

    # Webhooks

    def rotate_webhook_secret(self) -> R:
        """A new signing secret (shown only in this answer)."""
        return self._request("POST", "/v1/webhooks/secret")

    def webhook_deliveries(self, **filters: Any) -> R:
        return self._request("GET", "/v1/webhooks/deliveries", params=filters)

    def webhook_delivery(self, delivery_id: str) -> R:
        return self._request("GET", f"/v1/webhooks/deliveries/{delivery_id}")

    def redeliver(self, delivery_id: str) -> R:
        path = f"/v1/webhooks/deliveries/{delivery_id}/redeliver"
        return self._request("POST", path, retry=True)

    # Sentiment monitors

    def create_monitor(
        self,
        name: str,
        model: str,
        *,
        window: dict[str, int],
        rule: dict[str, float],
        negative_label: str | None = None,
        webhook_url: str | None = None,
    ) -> R:
        """A monitor over `model` (a registered or installed sequence classifier).
        `window`: {"items": N} or {"seconds": T}; `rule`: share_above and/or rise_above
        (fractions), min_items."""
        body: dict[str, Any] = {"name": name, "model": model, "window": window, "rule": rule}
        if negative_label is not None:
            body["negative_label"] = negative_label
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        return self._request("POST", "/v1/monitors", json=body)

    def monitors(self, **filters: Any) -> R:
        return self._request("GET", "/v1/monitors", params=filters)

    def monitor(self, monitor_id: str) -> R:
        """The monitor with its state, item counts, current window and recent history."""
        return self._request("GET", f"/v1/monitors/{monitor_id}")

    def delete_monitor(self, monitor_id: str) -> R:
        return self._request("DELETE", f"/v1/monitors/{monitor_id}", retry=True)

    def feed_monitor(
        self, monitor_id: str, texts: list[str], *, idempotency_key: str | None = None
    ) -> R:
        """Post one batch of texts (classified by one predict job); always sends an
        Idempotency-Key, so a retried post never feeds the batch twice."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        path = f"/v1/monitors/{monitor_id}/items"
        return self._request("POST", path, json={"texts": texts}, headers=headers, retry=True)

    def monitor_stats(self, monitor_id: str, **filters: Any) -> R:
        """Window evaluations, newest first: `limit`, `cursor`."""
        return self._request("GET", f"/v1/monitors/{monitor_id}/stats", params=filters)

    def monitor_alerts(self, monitor_id: str, **filters: Any) -> R:
        return self._request("GET", f"/v1/monitors/{monitor_id}/alerts", params=filters)


class Client(_Resources[Any]):
    """The blocking client."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        retries: int = RETRIES,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, headers=_auth_headers(api_key, headers)
        )
        self._retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        retry: bool | None = None,
        pick: str | None = None,
        body: Body = "json",
        **kwargs: Any,
    ) -> Any:
        """One call; reads (and calls marked safe) are retried on connection errors and
        503s. Answers with no body come back as None."""
        safe = method == "GET" if retry is None else retry
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if not _should_retry(safe, attempt, self._retries, None):
                    raise
                time.sleep(_backoff_s(attempt))
                continue
            if response.is_error and _should_retry(
                safe, attempt, self._retries, response.status_code
            ):
                time.sleep(_backoff_s(attempt))
                continue
            return _answer(response, pick, body)

    def iter_jobs(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every job matching `filters`, newest first, page by page."""
        params = dict(filters)
        while True:
            page = self.list_jobs(**params)
            yield from page["data"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def iter_events(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """The job's events as they happen (server-sent events), until it ends. A dropped
        connection is resumed after the last event received (Last-Event-ID)."""
        last = after
        failures = 0
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            path = f"/v1/jobs/{job_id}/events/stream"
            try:
                with self._http.stream("GET", path, headers=headers, timeout=SSE_TIMEOUT) as r:
                    if r.is_error:
                        r.read()
                        raise error_from(r)
                    for message in parse_sse(r.iter_lines()):
                        if message.get("event") == "end":
                            return
                        last = int(message["id"])
                        failures = 0
                        yield message["data"]
            except httpx.TransportError:
                failures += 1
                if failures > self._retries:
                    raise
                time.sleep(_backoff_s(failures))

    def stream_tokens(self, job_id: str) -> Iterator[dict[str, Any]]:
        """A generation job's `token` / `restart` / `done` server-sent events."""
        with self._http.stream("GET", f"/v1/jobs/{job_id}/stream", timeout=SSE_TIMEOUT) as r:
            if r.is_error:
                r.read()
                raise error_from(r)
            yield from parse_sse(r.iter_lines())

    def wait(
        self,
        job_id: str,
        timeout: float = 600.0,
        *,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll with backoff until the job ends; TimeoutError if it doesn't in time."""
        poll = _Poll(job_id, timeout, on_update)
        while True:
            job: dict[str, Any] = self.get(job_id)
            if poll.ended(job):
                return job
            time.sleep(poll.next_delay())

    def run(
        self, kind: str, spec: dict[str, Any], *, timeout: float = 600.0, **options: Any
    ) -> dict[str, Any]:
        """Submit a job and wait for it; JobFailedError unless it succeeds."""
        return _succeeded(self.wait(self.submit(kind, spec, **options)["id"], timeout))

    def rank(
        self,
        model: str,
        query: str,
        candidates: list[str],
        *,
        top_k: int | None = None,
        label: str | None = None,
        timeout: float = 600.0,
    ) -> list[dict[str, Any]]:
        """Candidates scored against `query` by a pair classifier, best first:
        [{"index", "text", "score"}, ...] (`index`: the place in `candidates`)."""
        spec = rank_spec(model, query, candidates, top_k, label)
        ranked: list[dict[str, Any]] = self.run("predict", spec, timeout=timeout)["result"][
            "ranked"
        ]
        return ranked


class AsyncClient(_Resources[Awaitable[Any]]):
    """The asyncio client: the same calls as `Client`, awaited
    (`job = await client.submit(...)`, `async for event in client.iter_events(id)`)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        retries: int = RETRIES,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, headers=_auth_headers(api_key, headers)
        )
        self._retries = retries

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        retry: bool | None = None,
        pick: str | None = None,
        body: Body = "json",
        **kwargs: Any,
    ) -> Any:
        safe = method == "GET" if retry is None else retry
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if not _should_retry(safe, attempt, self._retries, None):
                    raise
                await asyncio.sleep(_backoff_s(attempt))
                continue
            if response.is_error and _should_retry(
                safe, attempt, self._retries, response.status_code
            ):
                await asyncio.sleep(_backoff_s(attempt))
                continue
            return _answer(response, pick, body)

    async def iter_jobs(self, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        """Every job matching `filters`, newest first, page by page."""
        params = dict(filters)
        while True:
            page = await self.list_jobs(**params)
            for job in page["data"]:
                yield job
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    async def _sse(self, path: str, headers: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        async with self._http.stream("GET", path, headers=headers, timeout=SSE_TIMEOUT) as r:
            if r.is_error:
                await r.aread()
                raise error_from(r)
            parser = SSEParser()
            async for line in r.aiter_lines():
                message = parser.feed(line)
                if message is not None:
                    yield message
            last = parser.flush()
            if last is not None:
                yield last

    async def iter_events(self, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        """The job's events as they happen, until it ends; resumed after a dropped
        connection from the last event received (Last-Event-ID)."""
        last = after
        failures = 0
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            try:
                async for message in self._sse(f"/v1/jobs/{job_id}/events/stream", headers):
                    if message.get("event") == "end":
                        return
                    last = int(message["id"])
                    failures = 0
                    yield message["data"]
            except httpx.TransportError:
                failures += 1
                if failures > self._retries:
                    raise
                await asyncio.sleep(_backoff_s(failures))

    async def stream_tokens(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """A generation job's `token` / `restart` / `done` server-sent events."""
        async for message in self._sse(f"/v1/jobs/{job_id}/stream", {}):
            yield message

    async def wait(
        self,
        job_id: str,
        timeout: float = 600.0,
        *,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll with backoff until the job ends; TimeoutError if it doesn't in time."""
        poll = _Poll(job_id, timeout, on_update)
        while True:
            job: dict[str, Any] = await self.get(job_id)
            if poll.ended(job):
                return job
            await asyncio.sleep(poll.next_delay())

    async def run(
        self, kind: str, spec: dict[str, Any], *, timeout: float = 600.0, **options: Any
    ) -> dict[str, Any]:
        """Submit a job and wait for it; JobFailedError unless it succeeds."""
        job = await self.submit(kind, spec, **options)
        return _succeeded(await self.wait(job["id"], timeout))

    async def rank(
        self,
        model: str,
        query: str,
        candidates: list[str],
        *,
        top_k: int | None = None,
        label: str | None = None,
        timeout: float = 600.0,
    ) -> list[dict[str, Any]]:
        """Candidates scored against `query` by a pair classifier, best first."""
        spec = rank_spec(model, query, candidates, top_k, label)
        job = await self.run("predict", spec, timeout=timeout)
        ranked: list[dict[str, Any]] = job["result"]["ranked"]
        return ranked
