"""The one mapping from errors to HTTP responses with `{"error": {type, message, param, code}}`.

The body is also OpenAI's error envelope, so OpenAI SDKs pointed at /v1 read it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route

from core.enums import JobKind
from core.errors import (
    AuthenticationError,
    BadRequestError,
    IdempotencyConflictError,
    InvalidRequestError,
    InvalidStateError,
    JobCancelledError,
    JobFailedError,
    MalformedBodyError,
    ModelyardError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitedError,
    ServiceUnavailableError,
)
from db.session import DATABASE_UNAVAILABLE

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5
_KIND_TAGS = frozenset(k.value for k in JobKind)

STATUS_FOR_ERROR: dict[type[ModelyardError], int] = {
    InvalidRequestError: 422,
    BadRequestError: 400,
    MalformedBodyError: 400,
    PayloadTooLargeError: 413,
    NotFoundError: 404,
    AuthenticationError: 401,
    PermissionDeniedError: 403,
    RateLimitedError: 429,
    QuotaExceededError: 429,
    IdempotencyConflictError: 409,
    InvalidStateError: 409,
    ServiceUnavailableError: 503,
    JobCancelledError: 409,
    JobFailedError: 500,
}

TYPE_FOR_HTTP_STATUS: dict[int, str] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: PayloadTooLargeError.type,
    415: "unsupported_media_type",
}


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {"type", "message", "param", "code"}}` (OpenAI's
    envelope; `code` repeats `type`, which is what OpenAI clients branch on)."""

    error: ErrorDetail


def _documented(description: str) -> dict[str, Any]:
    # The explicit JSON content keeps errors JSON in the docs of routes whose own answers
    # are not (the event stream).
    return {
        "model": ErrorBody,
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


# What any operation may answer besides its success; documented on every route.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _documented(
        "The body is not valid JSON (or not a form where one is expected), or a request "
        "to an OpenAI-compatible route (serving, files, fine-tuning jobs, batches) is "
        "invalid or sets a parameter this server does not honour."
    ),
    401: _documented("No API key, or one that is unknown or revoked (/v1 routes)."),
    403: _documented("The API key lacks the scope this route needs."),
    404: _documented("No such resource (or not visible to the caller)."),
    409: _documented("Conflicts with the resource's state or an earlier Idempotency-Key."),
    413: _documented("The body is larger than the limit; it was not read."),
    422: _documented("The request is well-formed but invalid; nothing was changed."),
    429: _documented("Rate limit or queued-jobs quota reached; retry after Retry-After."),
    503: _documented("The database or broker is unreachable; retry after Retry-After."),
}


def error_body(type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "param": param, "code": type_}}


def status_for(exc: ModelyardError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR_ERROR:
            return STATUS_FOR_ERROR[cls]
    return 500


# OpenAI's own resources: an invalid request there is a 400 `invalid_request_error`, as
# OpenAI answers it (its SDKs raise BadRequestError), where our routes answer 422
OPENAI_RESOURCE_PATHS = ("/v1/files", "/v1/fine_tuning/", "/v1/batches")


def _as_openai(request: Request, status: int, type_: str) -> tuple[int, str]:
    """An invalid request to one of OpenAI's resources is its 400 (a specific type, such as
    `invalid_dataset`, stays); anything else as it is."""
    path = request.scope.get("path", "")
    if status != 422 or not path.startswith(OPENAI_RESOURCE_PATHS):
        return status, type_
    return 400, BadRequestError.type if type_ == InvalidRequestError.type else type_


def _param(loc: tuple[Any, ...]) -> str | None:
    if len(loc) > 1 and loc[0] == "body" and loc[1] in _KIND_TAGS:
        loc = loc[:1] + loc[2:]  # the discriminated union's tag is not a field
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


async def _modelyard_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelyardError)
    headers: dict[str, str] = {}
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, QuotaExceededError):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    elif isinstance(exc, InvalidStateError | IdempotencyConflictError | JobCancelledError):
        # OpenAI's SDKs retry a 409 (a lock timeout there) unless told this: ours are final.
        headers["x-should-retry"] = "false"
    status, type_ = _as_openai(request, status_for(exc), exc.type)
    return JSONResponse(
        error_body(type_, exc.message, exc.param), status_code=status, headers=headers or None
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return JSONResponse(
            error_body(MalformedBodyError.type, "request body is not valid JSON"), status_code=400
        )
    if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        first = {**first, "loc": (*tuple(first.get("loc", ())), "kind")}
        errors = [first]
    message = "; ".join(
        f"{_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg', '')}" for e in errors[:5]
    )
    status, type_ = _as_openai(request, 422, InvalidRequestError.type)
    return JSONResponse(
        error_body(type_, message, _param(tuple(first.get("loc", ())))), status_code=status
    )


def _leaf_routes(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """The app's routes one by one: FastAPI (0.165) keeps an included router as one route
    (its `original_router` holds the routes, with their whole paths)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaf_routes(inner.routes)
        else:
            yield route


def _allowed_methods(request: Request) -> str:
    """The methods of the resource the request's path names: every route of the first path
    template that matches it (Starlette's 405 names only the first route's methods). The
    first, as routing picks: `/v1/models/installed` is its own resource, not a `{name}`."""
    scope = {**request.scope, "method": "\x00"}  # a method no route answers: path only
    routes = list(_leaf_routes(request.app.router.routes))
    path = next(
        (getattr(r, "path", None) for r in routes if r.matches(scope)[0] != Match.NONE), None
    )
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, Route) and route.path == path:
            methods.update(route.methods or ())
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = TYPE_FOR_HTTP_STATUS.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return JSONResponse(
        error_body(type_, str(exc.detail)), status_code=exc.status_code, headers=headers
    )


async def _database_unavailable(_: Request, exc: Exception) -> JSONResponse:
    logger.warning("database unavailable: %s", type(exc).__name__)
    return JSONResponse(
        error_body(ServiceUnavailableError.type, "the database is unavailable; retry shortly"),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ModelyardError, _modelyard_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for unavailable in DATABASE_UNAVAILABLE:
        app.add_exception_handler(unavailable, _database_unavailable)
    app.add_exception_handler(Exception, _unhandled)
