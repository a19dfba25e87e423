"""Fault 6 of issue 16 (the parts about quotas and liveness): concurrent submits against
a queued-jobs quota on PostgreSQL, and an idle worker beside a tenant at its running cap.

tests/faults/test_guard_faults.py runs them."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from db import tenants as tenants_repo
from db.session import session_scope
from tests.faults.scenarios import Lab
from tests.support.auth import bearer


def tenant_key(lab: Lab, **quotas: int) -> str:
    """A new tenant with `quotas` (and room in its rate limit) and a jobs:write key."""
    with session_scope(lab.database_url) as s:
        tenant = tenants_repo.create_tenant(
            s, f"guard-{uuid.uuid4().hex[:8]}", requests_per_minute=100_000, **quotas
        )
        return tenants_repo.create_key(s, tenant.id, "guard", ["jobs:read", "jobs:write"]).secret


def concurrent_posts_against_quota(lab: Lab, posts: int = 50, quota: int = 10) -> list[int]:
    """`posts` POST /v1/jobs at once from one tenant whose queued quota is `quota`, with no
    worker taking any of them: the status code of each."""
    for proc in lab.fleet(0):
        proc.stop()
    key = tenant_key(lab, max_queued_jobs=quota)

    async def post_all() -> list[int]:
        async with httpx.AsyncClient(
            base_url=lab.stack.base_url, headers=bearer(key), timeout=60
        ) as client:
            body = {"kind": "noop", "spec": {"duration_s": 0.01}}
            replies = await asyncio.gather(
                *(client.post("/v1/jobs", json=body) for _ in range(posts))
            )
        return [r.status_code for r in replies]

    return asyncio.run(post_all())
