"""API keys for tests: made straight in the database, like `modelyard keys create`."""

from __future__ import annotations

from collections.abc import Sequence

from core.errors import NotFoundError
from db import tenants as repo
from db.models import DEFAULT_TENANT
from db.session import migrate, session_scope

# Tests make far more requests a minute than the default limit allows; the rate limit
# test sets its own.
TEST_RPM = "1000000"


def make_key(
    database_url: str,
    scopes: Sequence[str] = ("admin",),
    tenant: str = DEFAULT_TENANT,
    name: str = "tests",
) -> str:
    """A new key of `tenant` (id or name, created when missing) holding `scopes`."""
    migrate(database_url)
    with session_scope(database_url) as session:
        try:
            tenant_id = repo.require_tenant(session, tenant).id
        except NotFoundError:
            tenant_id = repo.create_tenant(session, tenant).id
        return repo.create_key(session, tenant_id, name, list(scopes)).secret


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
