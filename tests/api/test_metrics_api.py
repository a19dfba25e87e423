"""`GET /metrics`: Prometheus values follow the jobs as they move."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.main import create_app
from core.enums import JobStatus
from core.settings import Settings
from db import jobs as jobs_repo
from db.attempts import finish_job
from db.models import DEFAULT_TENANT
from db.session import session_scope
from tests.support.auth import bearer, make_key


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_values_change_as_jobs_move(client: TestClient, settings: Settings) -> None:
    before = scrape(client)
    ids = [
        client.post("/v1/jobs", json={"kind": "noop", "spec": {}}).json()["id"] for _ in range(3)
    ]
    queued = scrape(client)
    assert value(queued, "modelyard_jobs", kind="noop", status="queued") == (
        value(before, "modelyard_jobs", kind="noop", status="queued") + 3
    )
    assert value(queued, "modelyard_queue_depth", queue="generate") >= 3
    assert value(queued, "modelyard_queue_oldest_age_seconds", queue="generate") >= 0
    assert value(queued, "modelyard_queue_depth", queue="train") == 0

    for job_id in ids[:2]:
        with session_scope(settings.database_url) as session:
            assert jobs_repo.claim(session, job_id, "w1", timedelta(seconds=30))
        with session_scope(settings.database_url) as session:
            assert finish_job(session, job_id, JobStatus.SUCCEEDED, attempt=1)
    done = scrape(client)
    assert value(done, "modelyard_jobs", kind="noop", status="succeeded") == (
        value(before, "modelyard_jobs", kind="noop", status="succeeded") + 2
    )
    assert value(done, "modelyard_queue_depth", queue="generate") == (
        value(queued, "modelyard_queue_depth", queue="generate") - 2
    )
    runs = value(done, "modelyard_job_run_seconds_count", kind="noop")
    assert runs == value(before, "modelyard_job_run_seconds_count", kind="noop") + 2
    assert value(done, "modelyard_job_run_seconds_bucket", kind="noop", le="+Inf") == runs
    assert value(done, "modelyard_job_run_seconds_bucket", kind="noop", le="60.0") == runs
    waits = value(done, "modelyard_job_wait_seconds_count", kind="noop")
    assert waits == value(before, "modelyard_job_wait_seconds_count", kind="noop") + 2
    assert "modelyard_generated_tokens_total" in {name for name, _ in done}

    with session_scope(settings.database_url) as session:
        assert jobs_repo.claim(session, ids[2], "w1", timedelta(seconds=30))
    with session_scope(settings.database_url) as session:
        detail = {"step": 3, "total_steps": 10, "samples_per_s": 12.5}
        jobs_repo.renew_lease(session, ids[2], 1, timedelta(seconds=30), 0.3, detail)
    training = scrape(client)
    # no job or tenant labels unless the operator asks for them: one total
    assert value(training, "modelyard_training_samples_per_second") == 12.5
    assert {labels for name, labels in training if "samples_per_second" in name} == {()}
    labelled = settings.model_copy(update={"metrics_job_labels": True})
    with TestClient(create_app(labelled)) as c:
        c.headers.update(client.headers)
        found = scrape(c)
    rate = value(found, "modelyard_training_samples_per_second", job_id=ids[2], tenant="default")
    assert rate == 12.5
    with session_scope(settings.database_url) as session:
        assert finish_job(session, ids[2], JobStatus.SUCCEEDED, attempt=1)
    # only running jobs report a rate
    assert value(scrape(client), "modelyard_training_samples_per_second") == 0


def test_metrics_need_an_operator_key_with_the_metrics_scope(
    client: TestClient, settings: Settings
) -> None:
    with TestClient(create_app(settings)) as anonymous:
        assert anonymous.get("/metrics").status_code == 401
        for scopes, tenant, code in [
            (["jobs:read", "jobs:write"], DEFAULT_TENANT, 403),
            (["metrics"], "metrics-other-tenant", 403),  # figures cover every tenant
            (["metrics"], DEFAULT_TENANT, 200),
        ]:
            key = make_key(settings.database_url, scopes, tenant=tenant)
            resp = anonymous.get("/metrics", headers=bearer(key))
            assert resp.status_code == code, (scopes, tenant, resp.text)
            if code == 403:
                assert resp.json()["error"]["type"] == "permission_denied"


def test_scrapes_within_the_cache_period_do_not_query_again(settings: Settings) -> None:
    cached = settings.model_copy(update={"metrics_cache_s": 3600})
    with TestClient(create_app(cached)) as c:
        c.headers.update(bearer(make_key(settings.database_url)))
        first = c.get("/metrics").text
        c.post("/v1/jobs", json={"kind": "noop", "spec": {}})
        assert c.get("/metrics").text == first  # the copy, not a new query
