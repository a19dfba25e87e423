"""The body limit answers 413 as soon as a streamed body passes it: the rest is never read."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.exceptions import HTTPException

from api.limits import BodySizeLimit, json_shape_problem

CHUNK = 8192


def test_a_streamed_body_is_refused_after_the_limit_not_read_whole() -> None:
    pulled = 0
    total_chunks = 1000  # 8 MB offered, the limit is 64 KiB

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * CHUNK, "more_body": pulled < total_chunks}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass

    async def send(message: Any) -> None:
        pass

    limited = BodySizeLimit(app, max_bytes=64 * 1024)
    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "headers": []}
    try:
        asyncio.run(limited(scope, receive, send))
    except HTTPException as exc:
        assert exc.status_code == 413
    else:
        raise AssertionError("no 413")
    assert pulled == 64 * 1024 // CHUNK + 1


def test_a_declared_length_over_the_limit_is_refused_before_any_read() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body was read")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()

    async def send(message: Any) -> None:
        sent.append(message)

    limited = BodySizeLimit(app, max_bytes=1024)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/jobs",
        "headers": [(b"content-length", b"999999999")],
    }
    asyncio.run(limited(scope, receive, send))
    assert sent[0]["status"] == 413


def test_json_shape_limits() -> None:
    assert json_shape_problem({"a": [1, {"b": 2}]}, max_depth=3, max_items=10) is None
    assert "deeper" in str(json_shape_problem([[[[1]]]], max_depth=3, max_items=10))
    assert "elements" in str(json_shape_problem({"a": list(range(11))}, 5, 10))
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    assert json_shape_problem(deep, 32, 10) is not None  # no recursion error
