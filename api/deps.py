from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.auth import Principal, require
from core.dispatch import JobPublisher
from core.settings import Settings
from core.token_stream import TokenStreamReader
from db.session import get_sessionmaker


# The two lookups below are `async` so FastAPI calls them on the event loop instead
# of sending each to the thread pool (a hop per dependency per request).
async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_publisher(request: Request) -> JobPublisher:
    publisher: JobPublisher = request.app.state.publisher
    return publisher


async def get_token_reader(request: Request) -> TokenStreamReader:
    reader: TokenStreamReader = request.app.state.token_reader
    return reader


T = TypeVar("T")


async def in_create_slot(request: Request, create: Callable[..., T], *args: Any) -> T:
    """Run a job's creation in the thread pool, at most `create_concurrency` at once in this
    process (the app's `create_limiter`). A burst's creations then end a few at a time, in
    arrival order, instead of all of them taking turns on the database's write lock."""
    limiter: anyio.CapacityLimiter = request.app.state.create_limiter
    return await anyio.to_thread.run_sync(functools.partial(create, *args), limiter=limiter)


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
PublisherDep = Annotated[JobPublisher, Depends(get_publisher)]
TokenReaderDep = Annotated[TokenStreamReader, Depends(get_token_reader)]


@contextmanager
def request_session(settings: Settings) -> Iterator[Session]:
    """A session per request; the route commits, anything unfinished rolls back."""
    session = get_sessionmaker(settings.database_url)()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with request_session(settings) as session:
        yield session


def get_read_session(settings: SettingsDep) -> Iterator[Session]:
    """A session for routes that only read (on SQLite it never takes the write lock)."""
    session = get_sessionmaker(settings.database_url, readonly=True)()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]


# The caller of a /v1 route, holding the named scope (admin holds every scope).
JobsRead = Annotated[Principal, Depends(require("jobs:read"))]
JobsWrite = Annotated[Principal, Depends(require("jobs:write"))]
ModelsWrite = Annotated[Principal, Depends(require("models:write"))]
Admin = Annotated[Principal, Depends(require("admin"))]
MetricsReader = Annotated[Principal, Depends(require("metrics"))]
