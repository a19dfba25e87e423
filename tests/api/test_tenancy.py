"""Tenants and API keys: another tenant's objects are 404s, keys and scopes are enforced,
rate limits and quotas answer typed errors, and the audit log records who did what."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings
from db import tenants as tenants_repo
from db.jobs import claim_job
from db.models import ApiKey
from db.registry import register_model
from db.session import session_scope
from db.training import add_checkpoint
from tests.support.auth import bearer, make_key

TEXT_JSONL = b'{"text": "hello there"}\n{"text": "general kenobi"}\n'


def noop(client: TestClient, key: str | None = None, **body: Any) -> Any:
    headers = bearer(key) if key else {}
    return client.post("/v1/jobs", json={"kind": "noop", "spec": {}, **body}, headers=headers)


def error_type(resp: Any, status: int) -> str:
    assert resp.status_code == status, resp.text
    kind: str = resp.json()["error"]["type"]
    return kind


@pytest.fixture(scope="module")
def other_key(settings: Settings, client: TestClient) -> str:
    """A key of a second tenant with every scope but admin."""
    return make_key(
        settings.database_url,
        ("jobs:read", "jobs:write", "models:write"),
        tenant=f"other-{uuid.uuid4().hex[:6]}",
    )


@pytest.fixture(scope="module")
def owned(settings: Settings, client: TestClient) -> dict[str, str]:
    """A job (with a checkpoint), a dataset and a registered model of the default tenant."""
    job = noop(client).json()
    ds = client.post("/v1/datasets", files={"file": ("t.jsonl", TEXT_JSONL)}).json()
    model = f"ft:tiny:owned:{uuid.uuid4().hex[:8]}"
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job["id"], "w1", timedelta(seconds=30))
        add_checkpoint(s, job["id"], 5, "tenants/default/jobs/x/checkpoint-5", {})
        register_model(
            s,
            name=model,
            base_model="tiny-gpt2",
            task="causal_lm",
            method="full",
            adapter=False,
            job_id=job["id"],
            path="tenants/default/jobs/x/model",
            labels=[],
            metrics={},
        )
    return {"job": job["id"], "dataset": ds["id"], "model": model}


def test_another_tenants_objects_are_404_exactly_like_missing_ones(
    client: TestClient, owned: dict[str, str], other_key: str
) -> None:
    h = bearer(other_key)
    job, ds, model = owned["job"], owned["dataset"], owned["model"]
    for method, url in (
        ("GET", f"/v1/jobs/{job}"),
        ("POST", f"/v1/jobs/{job}/cancel"),
        ("GET", f"/v1/jobs/{job}/events"),
        ("GET", f"/v1/jobs/{job}/events/stream"),
        ("GET", f"/v1/jobs/{job}/outputs"),
        ("GET", f"/v1/jobs/{job}/metrics"),
        ("GET", f"/v1/jobs/{job}/checkpoints"),
        ("GET", f"/v1/jobs/{job}/stream"),
        ("GET", f"/v1/jobs/{job}/files/output"),
        ("GET", f"/v1/datasets/{ds}"),
        ("GET", f"/v1/datasets/{ds}/tokens?model=tiny-gpt2"),
        ("DELETE", f"/v1/datasets/{ds}"),
        ("GET", f"/v1/models/{model}"),
        ("DELETE", f"/v1/models/{model}"),
    ):
        theirs = client.request(method, url, headers=h)
        missing = client.request(method, url.replace(job, "job_x").replace(ds, "ds_x"), headers=h)
        if model in url:
            missing = client.request(method, url.replace(model, "ft:nope:x:1"), headers=h)
        assert error_type(theirs, 404) == "not_found", url
        assert missing.status_code == 404, url
    # Lists show only the caller's own.
    for url in ("/v1/jobs", "/v1/datasets", "/v1/models"):
        assert client.get(url, headers=h).json()["data"] == [], url
    # The owner still sees (and can act on) everything: nothing was cancelled or deleted.
    assert client.get(f"/v1/jobs/{job}").json()["status"] == "running"
    assert client.get(f"/v1/jobs/{job}/checkpoints").json()["data"][0]["step"] == 5
    assert client.get(f"/v1/datasets/{ds}").status_code == 200
    assert client.get(f"/v1/models/{model}").status_code == 200
    assert any(j["id"] == job for j in client.get("/v1/jobs").json()["data"])


def test_jobs_cannot_name_another_tenants_dataset_model_or_checkpoint(
    client: TestClient, owned: dict[str, str], other_key: str
) -> None:
    finetune = {
        "kind": "finetune",
        "spec": {
            "base_model": owned["model"],
            "task": "causal_lm",
            "training_dataset": owned["dataset"],
        },
    }
    resp = client.post("/v1/jobs", json=finetune, headers=bearer(other_key))
    assert error_type(resp, 422) == "invalid_request"
    assert "does not exist" in resp.json()["error"]["message"]
    generate = {"kind": "generate", "spec": {"model": owned["model"], "prompts": ["hi"]}}
    resp = client.post("/v1/jobs", json=generate, headers=bearer(other_key))
    assert "not in the registry" in resp.json()["error"]["message"]


def test_idempotency_keys_are_per_tenant(client: TestClient, other_key: str) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    mine = client.post("/v1/jobs", json={"kind": "noop", "spec": {}}, headers=key)
    theirs = client.post(
        "/v1/jobs", json={"kind": "noop", "spec": {}}, headers={**key, **bearer(other_key)}
    )
    assert mine.status_code == theirs.status_code == 202
    assert mine.json()["id"] != theirs.json()["id"]


def test_missing_unknown_and_revoked_keys_are_401(client: TestClient, settings: Settings) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Basic abc"}, bearer("my_nope")):
        resp = client.get("/v1/jobs", headers=headers)
        assert error_type(resp, 401) == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"
    created = client.post("/v1/admin/keys", json={"name": "short-lived", "scopes": ["jobs:read"]})
    assert created.status_code == 201, created.text
    key, key_id = created.json()["key"], created.json()["id"]
    assert key.startswith(created.json()["prefix"]) and len(key) > 40
    assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
    listed = client.get("/v1/admin/keys").json()["data"]
    assert key not in str(listed) and any(k["id"] == key_id for k in listed)
    assert client.delete(f"/v1/admin/keys/{key_id}").json()["revoked_at"] is not None
    assert error_type(client.get("/v1/jobs", headers=bearer(key)), 401) == "authentication_error"


def _key_in_db(database_url: str) -> tuple[str, str]:
    """(secret, id) of a new jobs:read key of the default tenant."""
    with session_scope(database_url) as session:
        new = tenants_repo.create_key(session, "default", "cached", ["jobs:read"])
        return new.secret, new.row.id


def _revoke_in_db(database_url: str, key_id: str) -> None:
    """Revoke as another process would (`modelyard keys revoke`, another API process)."""
    with session_scope(database_url) as session:
        tenants_repo.revoke_key(session, key_id, tenant_id=None)


def test_a_looked_up_key_is_remembered_for_api_key_cache_s(settings: Settings) -> None:
    """Within the period the process answers from what it looked up, so a revoke made
    elsewhere is not seen yet; a revoke through this process's API is seen at once."""
    remembering = settings.model_copy(update={"api_key_cache_s": 3600.0})
    with TestClient(create_app(remembering)) as app_client:
        key, key_id = _key_in_db(settings.database_url)
        assert app_client.get("/v1/jobs", headers=bearer(key)).status_code == 200
        _revoke_in_db(settings.database_url, key_id)
        assert app_client.get("/v1/jobs", headers=bearer(key)).status_code == 200
        other, other_id = _key_in_db(settings.database_url)
        assert app_client.get("/v1/jobs", headers=bearer(other)).status_code == 200
        admin = bearer(make_key(settings.database_url))
        revoked = app_client.delete(f"/v1/admin/keys/{other_id}", headers=admin)
        assert revoked.status_code == 200, revoked.text
        resp = app_client.get("/v1/jobs", headers=bearer(other))
        assert error_type(resp, 401) == "authentication_error"


def test_a_key_revoked_elsewhere_stops_working_after_api_key_cache_s(settings: Settings) -> None:
    short = settings.model_copy(update={"api_key_cache_s": 0.5})
    with TestClient(create_app(short)) as app_client:
        key, key_id = _key_in_db(settings.database_url)
        assert app_client.get("/v1/jobs", headers=bearer(key)).status_code == 200
        _revoke_in_db(settings.database_url, key_id)
        time.sleep(0.6)  # past the period: the next request looks the key up again
        resp = app_client.get("/v1/jobs", headers=bearer(key))
        assert error_type(resp, 401) == "authentication_error"


def test_a_key_without_the_scope_is_403(client: TestClient, settings: Settings) -> None:
    reader = make_key(settings.database_url, ("jobs:read",))
    writer = make_key(settings.database_url, ("jobs:write",))
    assert client.get("/v1/jobs", headers=bearer(reader)).status_code == 200
    assert error_type(noop(client, reader), 403) == "permission_denied"
    assert error_type(client.get("/v1/jobs", headers=bearer(writer)), 403) == "permission_denied"
    assert noop(client, writer).status_code == 202
    assert client.delete("/v1/models/ft:x:y:z", headers=bearer(reader)).status_code == 403
    for method, url in (("GET", "/v1/admin/keys"), ("GET", "/v1/audit")):
        assert client.request(method, url, headers=bearer(writer)).status_code == 403


def test_only_the_default_tenants_admin_manages_tenants(
    client: TestClient, settings: Settings
) -> None:
    outsider = make_key(settings.database_url, ("admin",), tenant=f"t-{uuid.uuid4().hex[:6]}")
    resp = client.post("/v1/admin/tenants", json={"name": "x"}, headers=bearer(outsider))
    assert error_type(resp, 403) == "permission_denied"
    resp = client.post(
        "/v1/admin/keys",
        json={"name": "k", "scopes": ["admin"], "tenant_id": "default"},
        headers=bearer(outsider),
    )
    assert resp.status_code == 403
    # Its own tenant's keys it manages; the default tenant's keys are invisible to it.
    assert client.get("/v1/admin/keys", headers=bearer(outsider)).json()["data"][0]["name"] == (
        "tests"
    )
    someone = client.get("/v1/admin/keys").json()["data"][0]["id"]
    assert client.delete(f"/v1/admin/keys/{someone}", headers=bearer(outsider)).status_code == 404
    created = client.post("/v1/admin/tenants", json={"name": f"n-{uuid.uuid4().hex[:6]}"})
    assert created.status_code == 201, created.text
    assert created.json()["id"] in {t["id"] for t in client.get("/v1/admin/tenants").json()["data"]}


def test_rate_limit_is_429_with_retry_after(client: TestClient) -> None:
    tenant = client.post(
        "/v1/admin/tenants", json={"name": f"rl-{uuid.uuid4().hex[:6]}", "requests_per_minute": 3}
    ).json()
    key = client.post(
        "/v1/admin/keys", json={"name": "rl", "scopes": ["jobs:read"], "tenant_id": tenant["id"]}
    ).json()["key"]
    answers = [client.get("/v1/jobs", headers=bearer(key)) for _ in range(5)]
    assert [r.status_code for r in answers[:3]] == [200, 200, 200]
    limited = answers[3]
    assert error_type(limited, 429) == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 120


def test_queued_jobs_quota_is_429(client: TestClient) -> None:
    tenant = client.post(
        "/v1/admin/tenants", json={"name": f"q-{uuid.uuid4().hex[:6]}", "max_queued_jobs": 2}
    ).json()
    key = client.post(
        "/v1/admin/keys", json={"name": "q", "scopes": ["jobs:write"], "tenant_id": tenant["id"]}
    ).json()["key"]
    assert [noop(client, key).status_code for _ in range(2)] == [202, 202]
    over = noop(client, key)
    assert error_type(over, 429) == "quota_exceeded"
    assert "retry-after" in over.headers


def test_dataset_over_the_tenants_size_limit_is_413(client: TestClient) -> None:
    tenant = client.post(
        "/v1/admin/tenants", json={"name": f"d-{uuid.uuid4().hex[:6]}", "max_dataset_bytes": 20}
    ).json()
    key = client.post(
        "/v1/admin/keys", json={"name": "d", "scopes": ["jobs:write"], "tenant_id": tenant["id"]}
    ).json()["key"]
    resp = client.post("/v1/datasets", files={"file": ("t.jsonl", TEXT_JSONL)}, headers=bearer(key))
    assert error_type(resp, 413) == "payload_too_large"


def test_user_supplied_names_never_become_paths(client: TestClient, settings: Settings) -> None:
    for name in ("../../etc/passwd", "/etc/passwd", "..\\..\\x"):
        resp = client.post("/v1/datasets", files={"file": (name, TEXT_JSONL)}, data={"name": name})
        assert resp.status_code == 201, resp.text
        ds = resp.json()
        stored = settings.data_dir / "tenants" / "default" / "datasets" / ds["id"] / "data.jsonl"
        assert stored.read_bytes() == TEXT_JSONL
        assert "/" not in ds["filename"] and "\\" not in ds["filename"]
    for url in ("/v1/models/../../etc/passwd", "/v1/models/%2Fetc%2Fpasswd", "/v1/jobs/..%2F.."):
        assert client.get(url).status_code in (404, 422), url


def test_json_nesting_and_array_limits_are_422(client: TestClient, settings: Settings) -> None:
    deep: Any = "x"
    for _ in range(settings.max_json_depth + 1):
        deep = [deep]
    resp = noop(client, metadata={"a": "b"}, spec={"deep": deep})
    assert error_type(resp, 422) == "invalid_request"
    assert "nesting" in resp.json()["error"]["message"]
    long = client.post(
        "/v1/jobs",
        json={"kind": "noop", "spec": {}, "metadata": {"k": "v"}, "x": [0] * 10_001},
    )
    assert error_type(long, 422) == "invalid_request"


def test_audit_log_records_who_did_what(
    client: TestClient, settings: Settings, other_key: str
) -> None:
    job = noop(client).json()["id"]
    client.post(f"/v1/jobs/{job}/cancel")
    ds = client.post("/v1/datasets", files={"file": ("t.jsonl", TEXT_JSONL)}).json()["id"]
    client.delete(f"/v1/datasets/{ds}")
    rows = client.get("/v1/audit", params={"limit": 500}).json()["data"]
    seen = {(r["action"], r["target_id"]) for r in rows}
    assert {
        ("job.create", job),
        ("job.cancel", job),
        ("dataset.create", ds),
        ("dataset.delete", ds),
    } <= seen
    mine = next(r for r in rows if r["target_id"] == job)
    assert mine["key_id"].startswith("key_") and mine["tenant_id"] == "default"
    theirs = noop(client, other_key).json()["id"]
    assert theirs not in {r["target_id"] for r in client.get("/v1/audit").json()["data"]}


def test_last_used_at_is_written_at_most_once_a_minute(
    client: TestClient, settings: Settings
) -> None:
    key = make_key(settings.database_url, ("jobs:read",))
    with session_scope(settings.database_url) as s:
        row = s.query(ApiKey).filter(ApiKey.hash == tenants_repo.hash_key(key)).one()
        key_id = row.id
        assert row.last_used_at is None
    client.get("/v1/jobs", headers=bearer(key))
    with session_scope(settings.database_url) as s:
        first = s.get(ApiKey, key_id).last_used_at  # type: ignore[union-attr]
    assert first is not None
    client.get("/v1/jobs", headers=bearer(key))
    with session_scope(settings.database_url) as s:
        assert s.get(ApiKey, key_id).last_used_at == first  # type: ignore[union-attr]


def test_development_mode_needs_no_key_and_says_so(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="api.main"),
        TestClient(create_app(settings.model_copy(update={"auth_disabled": True}))) as dev,
    ):
        assert dev.get("/readyz").json()["auth"] == "disabled"
        assert dev.get("/v1/jobs").status_code == 200
        assert dev.get("/v1/admin/keys").status_code == 200
    assert any("AUTH IS DISABLED" in r.getMessage() for r in caplog.records)


def test_another_tenants_webhook_deliveries_are_404(
    client: TestClient, settings: Settings, other_key: str
) -> None:
    from sqlalchemy import update

    from core.enums import WebhookEvent
    from db.models import Job
    from db.webhooks import queue_delivery

    job = noop(client).json()
    with session_scope(settings.database_url) as s:
        s.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(webhook_url="https://hooks.example.com/x", webhook_events=",completed,")
        )
        queue_delivery(s, job["id"], WebhookEvent.COMPLETED, {"status": "succeeded"})
    (delivery,) = client.get("/v1/webhooks/deliveries", params={"job_id": job["id"]}).json()["data"]
    h = bearer(other_key)
    assert error_type(client.get(f"/v1/webhooks/deliveries/{delivery['id']}", headers=h), 404)
    redeliver = client.post(f"/v1/webhooks/deliveries/{delivery['id']}/redeliver", headers=h)
    assert error_type(redeliver, 404) == "not_found"
    assert client.get("/v1/webhooks/deliveries", headers=h).json()["data"] == []
    assert client.get(f"/v1/webhooks/deliveries/{delivery['id']}").status_code == 200
