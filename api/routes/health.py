from __future__ import annotations

import logging

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import PublisherDep, ReadSessionDep, SettingsDep
from api.schemas import Health
from core.errors import ServiceUnavailableError

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health)
def readyz(session: ReadSessionDep, publisher: PublisherDep, settings: SettingsDep) -> Health:
    problems: list[str] = []
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:
        logger.warning("readyz: database unreachable: %s", type(exc).__name__)
        problems.append("database unreachable")
    try:
        publisher.ping()
    except Exception as exc:
        logger.warning("readyz: broker unreachable: %s", type(exc).__name__)
        problems.append("broker unreachable")
    if problems:
        raise ServiceUnavailableError("; ".join(problems))
    return Health(
        status="ok",
        database="ok",
        broker="ok",
        auth="disabled" if settings.auth_disabled else "on",
    )
