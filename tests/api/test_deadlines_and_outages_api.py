"""Per-job deadlines in the API, and a 503 (not a 500) while the database is unreachable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session


def test_deadlines_are_stored_and_shown(client: TestClient) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    resp = client.post(
        "/v1/jobs",
        json={
            "kind": "noop",
            "spec": {},
            "expires_at": expires.isoformat(),
            "max_runtime_s": 90,
        },
    )
    assert resp.status_code == 202, resp.text
    job = client.get(f"/v1/jobs/{resp.json()['id']}").json()
    assert datetime.fromisoformat(job["expires_at"]) == expires.replace(
        microsecond=expires.microsecond
    )
    assert job["max_runtime_s"] == 90


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "2999-01-01T00:00:00"}, "expires_at"),  # no time zone
        ({"max_runtime_s": 0}, "max_runtime_s"),
    ],
)
def test_bad_deadlines_are_422(client: TestClient, body: dict[str, object], param: str) -> None:
    resp = client.post("/v1/jobs", json={"kind": "noop", "spec": {}, **body})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == param


def test_database_unreachable_is_a_typed_503(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(self: Session, *args: object, **kw: object) -> None:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    for method in ("execute", "scalars", "scalar", "get", "flush"):
        monkeypatch.setattr(Session, method, unreachable)
    for resp in (
        client.get("/v1/jobs/job_0"),
        client.get("/v1/jobs"),
        client.post("/v1/jobs", json={"kind": "noop", "spec": {}}),
    ):
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["type"] == "service_unavailable"
        assert resp.headers["retry-after"] == "5"
