"""Request body limit enforced while the body streams in, before it is buffered."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from core.errors import InvalidRequestError, PayloadTooLargeError


class BodySizeLimit:
    """413 for a body over its limit: a declared Content-Length at once, a streamed one
    as soon as the bytes received pass it.

    `max_bytes` applies to every request; `limits` maps (method, path) to another
    limit, e.g. the larger one for dataset uploads.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, limits: Mapping[tuple[str, str], int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limits = dict(limits or {})

    def limit_for(self, scope: Scope) -> int:
        path = str(scope.get("path", "")).rstrip("/") or "/"
        return self.limits.get((str(scope.get("method", "")), path), self.max_bytes)

    async def _reject(self, send: Send, max_bytes: int) -> None:
        body = json.dumps(
            error_body(
                PayloadTooLargeError.type,
                f"request body exceeds {max_bytes} bytes",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.limit_for(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > max_bytes:
                    await self._reject(send, max_bytes)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise HTTPException(413, f"request body exceeds {max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def check_request_shape(request: Request) -> None:
    """Every route's checks before its own: one dependency for both, as each dependency
    FastAPI solves costs every request."""
    refuse_nul_characters(request)
    await limit_json_shape(request)


def refuse_nul_characters(request: Request) -> None:
    """422 for a NUL character in the path or the query: PostgreSQL cannot store or
    compare one, so it would otherwise surface as a server error."""
    scope = request.scope
    query: bytes = scope.get("query_string", b"")
    in_path = "\x00" in scope.get("root_path", "") or "\x00" in scope["path"]
    # the query is parsed only when its raw bytes could hold one (a URL built per request
    # and a parsed query cost every request otherwise)
    if in_path or (
        (b"\x00" in query or b"%00" in query)
        and any(
            "\x00" in key or "\x00" in value for key, value in request.query_params.multi_items()
        )
    ):
        raise InvalidRequestError("NUL characters are not allowed in the URL")


def json_shape_problem(value: Any, max_depth: int, max_items: int) -> str | None:
    """Why a parsed JSON body is too deep or has too long an array/object; None if fine.
    Iterative, so a deep body cannot exhaust the stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return f"JSON nesting deeper than {max_depth} levels"
        if len(item) > max_items:
            return f"a JSON array or object with more than {max_items} elements"
        stack.extend((child, depth + 1) for child in children)
    return None


async def limit_json_shape(request: Request) -> None:
    """422 for a JSON body nested deeper than max_json_depth, or with an array or object
    longer than max_json_items (the body was already parsed once and is cached)."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    if "json" not in request.headers.get("content-type", ""):
        return
    try:
        body = await request.json()
    except ValueError:
        return  # FastAPI answers the parse error itself
    settings = request.app.state.settings
    problem = json_shape_problem(body, settings.max_json_depth, settings.max_json_items)
    if problem is not None:
        raise InvalidRequestError(f"request body: {problem}", param="body")
