"""Webhook subscriptions on jobs, signing secrets and the delivery log, through the API."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.enums import JobStatus, WebhookEvent
from core.settings import Settings
from db import jobs as jobs_repo
from db import webhooks as webhooks_repo
from db.attempts import finish_job
from db.models import WebhookDelivery
from db.session import session_scope
from tests.support.auth import bearer, make_key

HOOK = "http://127.0.0.1:9/hook"


@pytest.fixture(scope="module")
def hook_client(settings: Settings) -> Iterator[TestClient]:
    allowed = settings.model_copy(update={"webhook_allowed_destinations": ["127.0.0.1/32"]})
    with TestClient(create_app(allowed)) as c:
        c.headers.update(bearer(make_key(settings.database_url)))
        yield c


@pytest.fixture
def signing_secret(hook_client: TestClient) -> None:
    """The tenant has a signing secret (made here unless an earlier test made one), so a
    webhook_url is accepted whichever of the module's tests ran before."""
    if not hook_client.get("/v1/webhooks/secret").json()["data"]:
        assert hook_client.post("/v1/webhooks/secret").status_code == 201


def job_count(client: TestClient) -> int:
    return len(client.get("/v1/jobs", params={"limit": 100}).json()["data"])


def submit(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/jobs", json={"kind": "noop", "spec": {}, **body})


def deliveries(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    resp = client.get("/v1/webhooks/deliveries", params={"job_id": job_id})
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


def run_job(settings: Settings, job_id: str, target: JobStatus = JobStatus.SUCCEEDED) -> None:
    with session_scope(settings.database_url) as session:
        assert jobs_repo.claim(session, job_id, "w1", timedelta(seconds=30)) is not None
    with session_scope(settings.database_url) as session:
        assert finish_job(session, job_id, target, attempt=1)


def test_a_webhook_needs_a_signing_secret_first(hook_client: TestClient) -> None:
    before = job_count(hook_client)
    resp = submit(hook_client, webhook_url=HOOK)
    assert resp.status_code == 422
    assert resp.json()["error"]["param"] == "webhook_url"
    assert "POST /v1/webhooks/secret" in resp.json()["error"]["message"]
    assert job_count(hook_client) == before


def test_the_secret_is_shown_once_then_only_as_a_hint(hook_client: TestClient) -> None:
    created = hook_client.post("/v1/webhooks/secret")
    assert created.status_code == 201
    secret = created.json()["secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    listed = hook_client.get("/v1/webhooks/secret")
    assert secret not in listed.text
    assert listed.json()["data"][0]["hint"] == secret[:10] + "..."


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1/h", "http://169.254.169.254/", "http://[::1]:9/h", "ftp://x.org/"],
)
def test_non_public_destinations_are_refused_and_nothing_is_created(
    hook_client: TestClient, url: str
) -> None:
    before = job_count(hook_client)
    resp = submit(hook_client, webhook_url=url)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["type"] == "invalid_webhook_url"
    assert job_count(hook_client) == before


def test_without_the_allowlist_loopback_is_refused(client: TestClient) -> None:
    resp = submit(client, webhook_url=HOOK)
    assert resp.status_code == 422
    assert resp.json()["error"]["type"] == "invalid_webhook_url"


def test_events_without_a_url_and_unknown_events_are_refused(hook_client: TestClient) -> None:
    assert submit(hook_client, webhook_events=["completed"]).status_code == 422
    bad = submit(hook_client, webhook_url=HOOK, webhook_events=["finished"])
    assert bad.status_code == 422


@pytest.mark.usefixtures("signing_secret")
def test_a_job_queues_started_and_completed_deliveries(
    hook_client: TestClient, settings: Settings
) -> None:
    job = submit(hook_client, webhook_url=HOOK).json()
    assert job["webhook_url"] == HOOK
    assert job["webhook_events"] == ["checkpoint", "completed", "started"]
    assert deliveries(hook_client, job["id"]) == []  # queued sends nothing
    run_job(settings, job["id"])
    sent = deliveries(hook_client, job["id"])
    assert [d["event"] for d in sent] == ["completed", "started"]  # newest first
    completed = sent[0]
    assert completed["status"] == "pending" and completed["attempts"] == 0
    assert completed["url"] == HOOK
    assert completed["payload"]["type"] == "job.completed"
    assert completed["payload"]["data"]["job_id"] == job["id"]
    assert completed["payload"]["data"]["status"] == "succeeded"
    one = hook_client.get(f"/v1/webhooks/deliveries/{completed['id']}").json()
    assert one["attempt_log"] == []


@pytest.mark.usefixtures("signing_secret")
def test_the_event_filter_is_respected(hook_client: TestClient, settings: Settings) -> None:
    job = submit(hook_client, webhook_url=HOOK, webhook_events=["completed"]).json()
    run_job(settings, job["id"], JobStatus.FAILED)
    sent = deliveries(hook_client, job["id"])
    assert [d["event"] for d in sent] == ["completed"]
    assert sent[0]["payload"]["data"]["status"] == "failed"


@pytest.mark.usefixtures("signing_secret")
def test_progress_deliveries_are_throttled(hook_client: TestClient, settings: Settings) -> None:
    job = submit(hook_client, webhook_url=HOOK, webhook_events=["progress"]).json()
    with session_scope(settings.database_url) as session:
        for p in (0.1, 0.2, 0.3):
            webhooks_repo.queue_delivery(
                session, job["id"], WebhookEvent.PROGRESS, {"progress": p}, throttle_s=60
            )
    sent = deliveries(hook_client, job["id"])
    assert [d["payload"]["data"]["progress"] for d in sent] == [0.1]


def test_jobs_without_a_webhook_queue_nothing(hook_client: TestClient, settings: Settings) -> None:
    job = submit(hook_client).json()
    run_job(settings, job["id"])
    assert deliveries(hook_client, job["id"]) == []


@pytest.mark.usefixtures("signing_secret")
def test_redeliver_and_unknown_deliveries(hook_client: TestClient, settings: Settings) -> None:
    assert hook_client.get("/v1/webhooks/deliveries/whd_nope").status_code == 404
    assert hook_client.post("/v1/webhooks/deliveries/whd_nope/redeliver").status_code == 404
    job = submit(hook_client, webhook_url=HOOK, webhook_events=["completed"]).json()
    run_job(settings, job["id"])
    (delivery,) = deliveries(hook_client, job["id"])
    with session_scope(settings.database_url) as session:
        row = session.get(WebhookDelivery, delivery["id"])
        assert row is not None
        token = webhooks_repo.take_delivery(session, row.id, row.next_attempt_at, 30)
        assert token is not None
        result = webhooks_repo.AttemptResult(500, "boom", 3.0)
        assert webhooks_repo.record_attempt(session, row.id, token, result, retry_in_s=None)
    failed = hook_client.get(f"/v1/webhooks/deliveries/{delivery['id']}").json()
    assert failed["status"] == "failed" and failed["attempts"] == 1
    assert failed["attempt_log"][0]["status_code"] == 500
    again = hook_client.post(f"/v1/webhooks/deliveries/{delivery['id']}/redeliver")
    assert again.status_code == 202
    assert again.json()["status"] == "pending" and again.json()["attempts"] == 0
    listed = hook_client.get("/v1/webhooks/deliveries", params={"status": "pending"}).json()
    assert delivery["id"] in {d["id"] for d in listed["data"]}


def test_rotation_keeps_the_previous_secret_signing_for_the_overlap(
    hook_client: TestClient, settings: Settings
) -> None:
    # a secret to rotate away from, whichever tests of the module ran before this one
    assert hook_client.post("/v1/webhooks/secret").status_code == 201
    with session_scope(settings.database_url) as session:
        before = webhooks_repo.signing_secrets(session, webhooks_repo.DEFAULT_TENANT)
    rotated = hook_client.post("/v1/webhooks/secret").json()
    assert rotated["previous_valid_until"] is not None
    with session_scope(settings.database_url) as session:
        after = webhooks_repo.signing_secrets(session, webhooks_repo.DEFAULT_TENANT)
    assert after[0] == rotated["secret"]
    assert set(before) <= set(after[1:])


@pytest.mark.usefixtures("signing_secret")
def test_a_checkpoint_queues_a_delivery_once(hook_client: TestClient, settings: Settings) -> None:
    from db import training as training_repo

    job = submit(hook_client, webhook_url=HOOK, webhook_events=["checkpoint"]).json()
    with session_scope(settings.database_url) as session:
        training_repo.add_checkpoint(session, job["id"], 20, "ckpt/20", {"loss": 1.5})
        training_repo.add_checkpoint(session, job["id"], 20, "ckpt/20", {"loss": 1.5})  # resaved
    (sent,) = deliveries(hook_client, job["id"])
    assert sent["event"] == "checkpoint"
    assert sent["payload"]["data"] == {"job_id": job["id"], "step": 20, "metrics": {"loss": 1.5}}
