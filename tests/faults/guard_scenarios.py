"""Fault 6 of issue 16: concurrent submits against a queued-jobs quota on PostgreSQL, an
idle worker beside a tenant at its running cap, and a webhook destination whose name
rebinds to an internal address after it was checked.

tests/faults/test_guard_faults.py runs them; bench/faults.py puts them in the table."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
from sqlalchemy import select

from db import tenants as tenants_repo
from db.models import DEFAULT_TENANT, Job
from db.session import session_scope
from tests.faults.scenarios import Lab, Outcome, ended
from tests.support.auth import bearer
from tests.support.faults import Audit, Figures
from tests.support.harness import TERMINAL, wait_for
from tests.support.webhooks import (
    REBINDING_NAME,
    Receiver,
    deliveries,
    give_secret,
    later_lookups_answer,
    rebinding_resolver,
    rows,
)
from workers.webhooks import WebhookSender


def tenant_key(lab: Lab, **quotas: int) -> str:
    """A new tenant with `quotas` (and room in its rate limit) and a jobs:write key."""
    with session_scope(lab.database_url) as s:
        tenant = tenants_repo.create_tenant(
            s, f"guard-{uuid.uuid4().hex[:8]}", requests_per_minute=100_000, **quotas
        )
        return tenants_repo.create_key(s, tenant.id, "guard", ["jobs:read", "jobs:write"]).secret


def concurrent_posts_against_quota(lab: Lab, posts: int = 50, quota: int = 10) -> Outcome:
    """`posts` POST /v1/jobs at once from one tenant whose queued quota is `quota`, with no
    worker taking any of them; then a worker runs the accepted ones."""
    lab.fleet(0)
    key = tenant_key(lab, max_queued_jobs=quota)

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=lab.stack.base_url, headers=bearer(key), timeout=60
        ) as client:
            body = {"kind": "noop", "spec": {"duration_s": 0.01}}
            return await asyncio.gather(*(client.post("/v1/jobs", json=body) for _ in range(posts)))

    replies = asyncio.run(post_all())
    codes = [r.status_code for r in replies]
    accepted = [r.json()["id"] for r in replies if r.status_code == 202]
    lab.fleet(1)
    found = _settled(lab, accepted)
    return Outcome(
        Figures.of(
            f"24c. {posts} concurrent POSTs against a queued quota of {quota} (PostgreSQL)",
            found,
            note=f"accepted {codes.count(202)}, refused 429 {codes.count(429)}; {ended(found)}",
        ),
        found,
        {"codes": codes},
    )


def _settled(lab: Lab, job_ids: list[str], timeout: float = 120) -> Audit:
    """The jobs audited once all have ended, read from the database (they are another
    tenant's than the lab's key)."""

    def finished() -> bool:
        with session_scope(lab.database_url, readonly=True) as s:
            found = s.scalars(select(Job.status).where(Job.id.in_(job_ids))).all()
        return len(found) == len(job_ids) and all(st in TERMINAL for st in found)

    wait_for(finished, timeout, "the jobs finished", 0.2)
    return lab.audit(job_ids)


def capped_tenant_liveness(lab: Lab, stall_s: float = 3.0) -> Outcome:
    """A tenant at its running cap (1) with a backlog, and an idle second worker: the
    backlog is work no worker may take, so `modelyard workers --check` passes. The jobs
    are cancelled afterwards."""
    lab.fleet(2)
    key = tenant_key(lab, max_running_jobs=1)
    with lab.stack.client() as c:
        c.headers.update(bearer(key))
        jobs = [
            c.post("/v1/jobs", json={"kind": "noop", "spec": {"duration_s": 12}}).json()["id"]
            for _ in range(3)
        ]

    def statuses() -> list[str]:
        with lab.stack.client() as c:
            c.headers.update(bearer(key))
            return [c.get(f"/v1/jobs/{j}").json()["status"] for j in jobs]

    wait_for(lambda: "running" in statuses(), 60, "one job running")
    time.sleep(stall_s + 2)  # the backlog has waited longer than worker_stall_s
    during = statuses()
    code, output = lab.check_workers()
    with lab.stack.client() as c:
        c.headers.update(bearer(key))
        for job_id in jobs:
            c.post(f"/v1/jobs/{job_id}/cancel")
    found = _settled(lab, jobs)
    return Outcome(
        Figures.of(
            "24b. tenant at its running cap with a backlog, an idle worker",
            found,
            note=f"liveness check exit {code}; {ended(found)}",
        ),
        found,
        {"during": during, "check": (code, output)},
    )


def rebinding_webhook_destination(lab: Lab) -> Outcome:
    """A webhook to `rebind.test`, a name that answers 127.0.0.2 (allowed) to the sender's
    check and 127.0.0.1 (an internal service, refused) to every later look-up. The lab's
    own recovery is stopped meanwhile; a sender in this process (the leader's code) sends
    the delivery, then the lab runs its job."""
    lab.stop_recovery()
    internal = Receiver("127.0.0.1")
    public = Receiver("127.0.0.2", internal.port)
    settings = lab.settings().model_copy(update={"webhook_allowed_destinations": ["127.0.0.2/32"]})
    try:
        give_secret(lab.database_url, DEFAULT_TENANT)
        target = f"http://{REBINDING_NAME}:{internal.port}/hook"
        (delivery_id,) = deliveries(lab.database_url, DEFAULT_TENANT, [target])
        sender = WebhookSender(settings, rebinding_resolver("127.0.0.2", "127.0.0.1"))
        with later_lookups_answer("127.0.0.1"):
            try:
                sender.send_due()
                sender.wait_idle(30)
            finally:
                sender.close()
        reached = {"internal": list(internal.seen), "checked": list(public.seen)}
    finally:
        internal.close()
        public.close()
    row = rows(lab.database_url, [delivery_id])[delivery_id]
    lab.stack.start_beat()
    lab.fleet(1)
    found = _settled(lab, [row.job_id])
    return Outcome(
        Figures.of(
            "24a. webhook name rebinding to an internal address after its check",
            found,
            note=(
                f"internal service reached {len(reached['internal'])} times, checked address"
                f" {len(reached['checked'])}; delivery {row.status}; job {ended(found)}"
            ),
        ),
        found,
        {"reached": reached, "delivery": (row.status, row.attempts), "port": internal.port},
    )
