"""Request body limit enforced while the body streams in, before it is buffered."""

from __future__ import annotations

import json
from collections.abc import Mapping

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


async def refuse_nul_characters(request: Request) -> None:
    """422 for a NUL character in the path or the query: PostgreSQL cannot store or
    compare one, so it would otherwise surface as a server error."""
    if "\x00" in request.url.path or any(
        "\x00" in key or "\x00" in value for key, value in request.query_params.multi_items()
    ):
        raise InvalidRequestError("NUL characters are not allowed in the URL")
