"""The HTTP API in-process, on SQLite and PostgreSQL, with the real Redis as broker."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.enums import JobStatus
from core.settings import Settings
from db.attempts import finish_job
from db.jobs import claim_job
from db.models import Job, JobEvent
from db.session import session_scope
from tests.api.conftest import MAX_BODY

SPEC: dict[str, Any] = {"model": "tiny-gpt2", "prompts": ["Hello there"], "max_new_tokens": 4}


def body(**changes: Any) -> dict[str, Any]:
    return {"kind": "generate", "spec": {**SPEC, **changes.pop("spec", {})}, **changes}


def count_rows(settings: Settings, model: type[Job] | type[JobEvent] = Job) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


@pytest.fixture(autouse=True)
def empty_tables(settings: Settings, client: TestClient) -> Iterator[None]:
    yield
    with session_scope(settings.database_url) as s:
        s.query(JobEvent).delete()
        s.query(Job).delete()


def assert_error(resp: Any, status: int, type_: str, param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == type_
    assert err["message"]
    if param is not None:
        assert err["param"] == param


def test_create_returns_202_commits_and_publishes(client: TestClient, settings: Settings) -> None:
    resp = client.post("/v1/jobs", json=body(metadata={"order_id": "A-1"}, priority=5))
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] == "queued"
    assert job["attempts"] == 0
    assert job["max_attempts"] == settings.max_attempts
    assert job["metadata"] == {"order_id": "A-1"}
    assert job["spec"]["temperature"] == 1.0
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    broker = redis.Redis.from_url(settings.broker_url)
    assert not broker.keys("modelyard:delivery:*")  # no bookkeeping beside the message
    # priority 5 of 0-9 lands on its own priority list, carrying only the job id
    queued = broker.lrange("generate:4", 0, -1)
    assert len(queued) == 1
    message = json.loads(queued[0])
    assert json.loads(__import__("base64").b64decode(message["body"]))[0] == [job["id"]]
    events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["data"]["status"] for e in events] == ["queued"]


PATTERN_PROPS = {"name": "o", "schema": {"properties": {"a": {"patternProperties": {}}}}}
BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown kind", {"kind": "transmogrify", "spec": SPEC}, "kind"),
    ("temperature out of range", body(spec={"temperature": 9}), "spec.temperature"),
    ("top_p zero", body(spec={"top_p": 0}), "spec.top_p"),
    ("empty prompts", body(spec={"prompts": []}), "spec.prompts"),
    ("blank prompt", body(spec={"prompts": ["ok", "  "]}), "spec.prompts"),
    ("too many tokens", body(spec={"max_new_tokens": 10**6}), "spec.max_new_tokens"),
    ("extra field", body(spec={"beam_width": 3}), "spec.beam_width"),
    ("priority", body(priority=11), "priority"),
    ("model escapes", body(spec={"model": "a/../../etc"}), "spec.model"),
    ("missing spec", {"kind": "generate"}, "spec"),
    ("penalty out of range", body(spec={"presence_penalty": 2.5}), "spec.presence_penalty"),
    (
        "unenforceable schema",
        body(spec={"response_format": {"type": "json_schema", "json_schema": PATTERN_PROPS}}),
        "spec.response_format.json_schema.json_schema.schema",
    ),
]


@pytest.mark.parametrize(("case", "payload", "param"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_invalid_specs_are_422_and_insert_nothing(
    client: TestClient, settings: Settings, case: str, payload: dict[str, Any], param: str
) -> None:
    resp = client.post("/v1/jobs", json=payload)
    assert_error(resp, 422, "invalid_request", param)
    assert count_rows(settings) == 0


def test_an_unenforceable_schema_names_the_keyword_and_its_path(client: TestClient) -> None:
    rf = {"type": "json_schema", "json_schema": PATTERN_PROPS}
    resp = client.post("/v1/jobs", json=body(spec={"response_format": rf}))
    assert resp.status_code == 422, resp.text
    message = resp.json()["error"]["message"]
    assert "response_format.json_schema.schema.properties.a: 'patternProperties'" in message
    overlapping = {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}
    rf = {"type": "json_schema", "json_schema": {"name": "either", "schema": overlapping}}
    resp = client.post("/v1/jobs", json=body(spec={"response_format": rf}))
    assert_error(resp, 422, "invalid_request", "spec.response_format")
    assert "oneOf" in resp.json()["error"]["message"]  # the grammar library's own reason
    ok = client.post("/v1/jobs", json=body(spec={"response_format": {"type": "json_object"}}))
    assert ok.status_code == 202, ok.text
    assert ok.json()["spec"]["response_format"] == {"type": "json_object"}


def test_non_json_body_is_400(client: TestClient, settings: Settings) -> None:
    resp = client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(resp, 400, "invalid_json")
    resp = client.post("/v1/jobs", content=b"kind=generate", headers={"content-type": "text/plain"})
    assert 400 <= resp.status_code < 500
    assert "error" in resp.json()
    assert count_rows(settings) == 0


def test_oversized_body_is_413_declared_or_streamed(client: TestClient, settings: Settings) -> None:
    big = body(spec={"prompts": ["x" * 30_000] * 4})
    resp = client.post("/v1/jobs", json=big)
    assert_error(resp, 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:
        raw = json.dumps(big).encode()
        for i in range(0, len(raw), 8192):
            yield raw[i : i + 8192]

    resp = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert len(json.dumps(big)) > MAX_BODY
    assert_error(resp, 413, "payload_too_large")
    assert count_rows(settings) == 0


def test_idempotency_key(client: TestClient, settings: Settings) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = client.post("/v1/jobs", json=body(), headers=key)
    assert first.status_code == 202
    again = client.post("/v1/jobs", json=body(), headers=key)
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json=body(spec={"max_new_tokens": 5}), headers=key)
    assert_error(other, 409, "idempotency_conflict", "Idempotency-Key")
    assert count_rows(settings) == 1


def test_list_filters_and_cursor_pagination(client: TestClient) -> None:
    ids = [
        client.post("/v1/jobs", json=body(metadata={"batch": "b1" if i % 2 else "b2"})).json()["id"]
        for i in range(5)
    ]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if not page["has_more"]:
            assert cursor is None
            break
    assert pages == 3
    assert seen == list(reversed(ids))
    b1 = client.get("/v1/jobs", params={"metadata": "batch:b1"}).json()["data"]
    assert sorted(j["id"] for j in b1) == sorted(ids[1::2])
    assert client.get("/v1/jobs", params={"status": "running"}).json()["data"] == []
    assert (
        len(client.get("/v1/jobs", params={"status": "queued", "kind": "generate"}).json()["data"])
        == 5
    )
    assert_error(
        client.get("/v1/jobs", params={"cursor": "bogus!"}), 422, "invalid_request", "cursor"
    )
    assert_error(
        client.get("/v1/jobs", params={"status": "exploded"}), 422, "invalid_request", "status"
    )
    assert_error(client.get("/v1/jobs", params={"metadata": "nocolon"}), 422, "invalid_request")


def test_unknown_ids_and_routes_are_typed_404(client: TestClient) -> None:
    for path in ("/v1/jobs/job_nope", "/v1/jobs/job_nope/events", "/v1/jobs/job_nope/outputs"):
        assert_error(client.get(path), 404, "not_found")
    assert_error(client.post("/v1/jobs/job_nope/cancel"), 404, "not_found")
    assert_error(client.get("/v2/nothing"), 404, "not_found")


def test_a_method_a_route_does_not_answer_is_405_with_the_ones_it_does(client: TestClient) -> None:
    for method, path, allowed in (
        ("PUT", "/v1/jobs", "GET, POST"),
        ("GET", "/v1/embeddings", "POST"),
        ("DELETE", "/v1/chat/completions", "POST"),
        # its own resource, though DELETE /v1/models/{name} would take the path too
        ("OPTIONS", "/v1/models/installed", "GET"),
        ("PUT", "/v1/models/ft:x", "DELETE, GET"),
    ):
        resp = client.request(method, path)
        assert_error(resp, 405, "method_not_allowed")
        assert resp.headers["Allow"] == allowed, (method, path)


def test_cancel_queued_then_again_then_finished(client: TestClient, settings: Settings) -> None:
    job = client.post("/v1/jobs", json=body()).json()
    resp = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 202
    assert resp.json()["status"] == "cancelled"
    assert resp.json()["finished_at"] is not None
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"

    done = client.post("/v1/jobs", json=body()).json()
    from datetime import timedelta

    with session_scope(settings.database_url) as s:
        assert claim_job(s, done["id"], "w1", timedelta(seconds=30))
        assert finish_job(s, done["id"], JobStatus.SUCCEEDED, attempt=1)
    assert_error(client.post(f"/v1/jobs/{done['id']}/cancel"), 409, "invalid_state")


def test_cancel_running_sets_flag_only(client: TestClient, settings: Settings) -> None:
    from datetime import timedelta

    job = client.post("/v1/jobs", json=body()).json()
    with session_scope(settings.database_url) as s:
        assert claim_job(s, job["id"], "w1", timedelta(seconds=30))
    resp = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 202
    assert resp.json()["status"] == "running"
    assert resp.json()["cancel_requested"] is True


def test_health(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready == {"status": "ok", "database": "ok", "broker": "ok", "auth": "on"}


@pytest.mark.parametrize(
    "url",
    [
        "/v1/jobs?metadata=a:%00",
        "/v1/jobs/job_%00x",
        "/v1/jobs/job_1/metrics?name=%00",
        "/v1/jobs?%00=a",  # in a key
    ],
)
def test_nul_characters_in_the_url_are_refused(client: TestClient, url: str) -> None:
    # Found by schemathesis: PostgreSQL cannot take NUL, which answered 500.
    resp = client.get(url)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["type"] == "invalid_request"


def test_a_queued_job_shows_its_place_on_its_queue(client: TestClient) -> None:
    def noop(priority: int) -> str:
        body = {"kind": "noop", "spec": {}, "priority": priority}
        job_id: str = client.post("/v1/jobs", json=body).json()["id"]
        return job_id

    depth_before = len(
        client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()["data"]
    )
    low, high, later = noop(0), noop(9), noop(9)
    places = {j: client.get(f"/v1/jobs/{j}").json()["queue"] for j in (low, high, later)}
    assert {p["name"] for p in places.values()} == {"generate"}
    assert {p["depth"] for p in places.values()} == {depth_before + 3}
    assert places[high]["position"] < places[later]["position"] < places[low]["position"]
    client.post(f"/v1/jobs/{high}/cancel")
    assert client.get(f"/v1/jobs/{high}").json()["queue"] is None
    assert client.get(f"/v1/jobs/{later}").json()["queue"]["position"] == places[high]["position"]
