"""The serving routes' refusals, answered before any job exists (no worker here): bad bodies,
quotas and rate limits in OpenAI's error shape."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi.testclient import TestClient

from tests.support.auth import bearer

CHAT = "/v1/chat/completions"
BODY = {"model": "org/some-model", "messages": [{"role": "user", "content": "Hi"}]}
# a oneOf whose branches overlap: the schema checker lets it by, the grammar library does not
OVERLAPPING = {
    "name": "either",
    "schema": {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]},
}


def tenant_key(client: TestClient, **limits: Any) -> str:
    tenant = client.post(
        "/v1/admin/tenants", json={"name": f"s-{uuid.uuid4().hex[:6]}", **limits}
    ).json()
    key: str = client.post(
        "/v1/admin/keys", json={"name": "s", "scopes": ["jobs:write"], "tenant_id": tenant["id"]}
    ).json()["key"]
    return key


def jobs_of(client: TestClient) -> int:
    return len(client.get("/v1/jobs", params={"limit": 100}).json()["data"])


def test_bad_bodies_are_400s_in_openais_error_shape(client: TestClient) -> None:
    before = jobs_of(client)
    cases: list[tuple[Any, str, str | None]] = [
        (b"{not json", "invalid_json", None),
        ({**BODY, "temperature": "hot"}, "invalid_request_error", "temperature"),
        ({**BODY, "logprobs": "yes"}, "invalid_request_error", "logprobs"),
        ({**BODY, "logprobs": True, "top_logprobs": 21}, "invalid_request_error", "top_logprobs"),
        ({**BODY, "top_logprobs": 2}, "invalid_request_error", "top_logprobs"),
        ({**BODY, "functions": [{"name": "f"}]}, "unsupported_parameter", "functions"),
        (
            {**BODY, "response_format": {"type": "json_schema", "json_schema": OVERLAPPING}},
            "invalid_request_error",
            "response_format",
        ),
        ({"messages": BODY["messages"]}, "invalid_request_error", "model"),
        (
            {**BODY, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "invalid_request_error",
            "messages[0].content",
        ),
    ]
    for body, kind, param in cases:
        if isinstance(body, bytes):
            resp = client.post(CHAT, content=body, headers={"content-type": "application/json"})
        else:
            resp = client.post(CHAT, json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert (error["type"], error["code"]) == (kind, kind), error
        if param is not None:
            assert error["param"] is not None and error["param"].startswith(param), error
    assert jobs_of(client) == before


def test_completions_without_a_prompt_name_it(client: TestClient) -> None:
    resp = client.post("/v1/completions", json={"model": "org/some-model"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "prompt"


def test_a_full_queue_is_a_429_with_retry_after(client: TestClient) -> None:
    key = tenant_key(client, max_queued_jobs=1)
    queued = client.post("/v1/jobs", json={"kind": "noop", "spec": {}}, headers=bearer(key))
    assert queued.status_code == 202
    over = client.post(CHAT, json=BODY, headers=bearer(key))
    assert over.status_code == 429
    assert over.json()["error"]["code"] == "quota_exceeded"
    assert int(over.headers["retry-after"]) >= 1


def test_a_rate_limited_key_is_a_429_with_retry_after(client: TestClient) -> None:
    key = tenant_key(client, requests_per_minute=1)
    bad = {**BODY, "n": 0}  # refused after the key is counted: no job is left waiting
    assert client.post(CHAT, json=bad, headers=bearer(key)).status_code == 400
    limited = client.post(CHAT, json=bad, headers=bearer(key))
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1


def test_the_openapi_document_describes_both_bodies(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    chat = paths[CHAT]["post"]
    schema = chat["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages", "stream"} <= set(schema["properties"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert (
        "prompt"
        in paths["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "properties"
        ]
    )
