"""Sentiment monitors through the API, on both databases: creation checks (model, labels,
window, rule, webhook), item batches as predict jobs (idempotent), and the evaluation a
worker runs when a batch's predict job succeeds (here called directly with made-up
predictions): window shares, one alert with one queued `monitor.alert` delivery,
hysteresis, recovery; another tenant sees none of it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings
from db.monitors import record_predictions
from db.outputs import OutputRecord
from db.session import session_scope
from tests.support.auth import bearer, make_key

MODEL = "tiny-sentiment"
LABELS = ["negative", "neutral", "positive"]
HOOK = "http://127.0.0.1:9/alerts"


def install_config(models_dir: Path, name: str, architecture: str, labels: list[str]) -> None:
    """An installed model as the checks see it: config.json and a safetensors file."""
    directory = models_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": [architecture], "id2label": dict(enumerate(labels))}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"")


@pytest.fixture(scope="module")
def mon_settings(settings: Settings) -> Settings:
    allowed = settings.model_copy(update={"webhook_allowed_destinations": ["127.0.0.1/32"]})
    install_config(allowed.models_dir, MODEL, "BertForSequenceClassification", LABELS)
    install_config(allowed.models_dir, "tiny-moods", "BertForSequenceClassification", ["a", "b"])
    install_config(allowed.models_dir, "tiny-tagger", "BertForTokenClassification", ["O", "B-X"])
    return allowed


@pytest.fixture(scope="module")
def api(mon_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(mon_settings)) as c:
        c.headers.update(bearer(make_key(mon_settings.database_url)))
        assert c.post("/v1/webhooks/secret").status_code == 201
        yield c


def body(**over: Any) -> dict[str, Any]:
    return {
        "name": "news",
        "model": MODEL,
        "window": {"items": 10},
        "rule": {"share_above": 0.5, "min_items": 10},
        **over,
    }


def count(api: TestClient) -> int:
    return len(api.get("/v1/monitors", params={"limit": 100}).json()["data"])


@pytest.mark.parametrize(
    ("over", "param"),
    [
        ({"model": "ft:nothing:here:00000000"}, "model"),
        ({"model": "not-installed"}, "model"),
        ({"model": "tiny-tagger"}, "model"),
        ({"model": "tiny-moods"}, "negative_label"),
        ({"negative_label": "angry"}, "negative_label"),
        ({"window": {"items": 10, "seconds": 60}}, "window"),
        ({"rule": {"min_items": 3}}, "rule"),
        ({"rule": {"share_above": 1.5}}, "rule"),
        ({"webhook_url": "http://10.1.2.3/hook"}, "webhook_url"),
    ],
)
def test_a_bad_monitor_is_refused_and_creates_nothing(
    api: TestClient, over: dict[str, Any], param: str
) -> None:
    before = count(api)
    resp = api.post("/v1/monitors", json=body(**over))
    assert resp.status_code == 422, resp.text
    assert param in (resp.json()["error"]["param"] or "")
    assert count(api) == before


def test_negative_label_can_be_named(api: TestClient) -> None:
    resp = api.post("/v1/monitors", json=body(model="tiny-moods", negative_label="b"))
    assert resp.status_code == 201, resp.text
    assert resp.json()["negative_label"] == "b"
    assert resp.json()["labels"] == ["a", "b"]


def feed(api: TestClient, monitor_id: str, texts: list[str], **headers: str) -> Any:
    return api.post(f"/v1/monitors/{monitor_id}/items", json={"texts": texts}, headers=headers)


def classify(settings: Settings, job_id: str, labels: list[str]) -> None:
    """What the worker does when the batch's predict job succeeds."""
    outputs = [
        OutputRecord(i, 0, label, "prediction", 3, 0, {"label": label, "score": 0.9})
        for i, label in enumerate(labels)
    ]
    with session_scope(settings.database_url) as session:
        assert record_predictions(session, job_id, outputs) is not None


def alert_deliveries(api: TestClient) -> list[dict[str, Any]]:
    rows = api.get("/v1/webhooks/deliveries", params={"limit": 100}).json()["data"]
    return [d for d in rows if d["event"] == "alert"]


def test_feed_evaluates_windows_and_alerts_once(api: TestClient, mon_settings: Settings) -> None:
    created = api.post("/v1/monitors", json=body(webhook_url=HOOK))
    assert created.status_code == 201, created.text
    mon = created.json()
    assert (mon["state"], mon["negative_label"], mon["labels"]) == ("ok", "negative", LABELS)
    assert mon["items"] == {"posted": 0, "classified": 0, "pending": 0}
    already = len(alert_deliveries(api))

    calm = feed(api, mon["id"], [f"calm {i}" for i in range(10)], **{"Idempotency-Key": "b1"})
    assert calm.status_code == 202, calm.text
    job_id = calm.json()["job_id"]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert (job["kind"], job["spec"]["model"], len(job["spec"]["texts"])) == ("predict", MODEL, 10)
    again = feed(api, mon["id"], [f"calm {i}" for i in range(10)], **{"Idempotency-Key": "b1"})
    assert again.status_code == 200 and again.json()["job_id"] == job_id
    clash = feed(api, mon["id"], ["other"], **{"Idempotency-Key": "b1"})
    assert clash.status_code == 409
    pending = api.get(f"/v1/monitors/{mon['id']}").json()
    assert pending["items"] == {"posted": 10, "classified": 0, "pending": 10}

    classify(mon_settings, job_id, ["positive"] * 6 + ["neutral"] * 2 + ["negative"] * 2)
    got = api.get(f"/v1/monitors/{mon['id']}").json()
    assert got["state"] == "ok"
    assert got["current"]["negative_share"] == pytest.approx(0.2)
    assert got["current"]["shares"] == pytest.approx(
        {"positive": 0.6, "neutral": 0.2, "negative": 0.2}
    )
    assert api.get(f"/v1/monitors/{mon['id']}/alerts").json()["data"] == []

    for _ in range(3):  # a sustained negative run: one alert
        batch = feed(api, mon["id"], [f"bad {i}" for i in range(10)])
        classify(mon_settings, batch.json()["job_id"], ["negative"] * 9 + ["neutral"])
    got = api.get(f"/v1/monitors/{mon['id']}").json()
    assert got["state"] == "alerting"
    assert [s["alerted"] for s in got["history"]] == [False, True, False, False]
    assert [s["negative_share"] for s in got["history"]] == pytest.approx([0.2, 0.9, 0.9, 0.9])
    alerts = api.get(f"/v1/monitors/{mon['id']}/alerts").json()["data"]
    assert len(alerts) == 1
    assert alerts[0]["negative_share"] == pytest.approx(0.9)
    assert "above 50%" in alerts[0]["reason"]
    sent = alert_deliveries(api)
    assert len(sent) == already + 1
    assert sent[0]["id"] == alerts[0]["delivery_id"]
    assert sent[0]["url"] == HOOK
    assert sent[0]["payload"]["type"] == "monitor.alert"
    assert sent[0]["payload"]["data"]["monitor_id"] == mon["id"]

    calm2 = feed(api, mon["id"], [f"fine {i}" for i in range(10)])
    classify(mon_settings, calm2.json()["job_id"], ["positive"] * 10)
    assert api.get(f"/v1/monitors/{mon['id']}").json()["state"] == "ok"
    bad2 = feed(api, mon["id"], [f"worse {i}" for i in range(10)])
    classify(mon_settings, bad2.json()["job_id"], ["negative"] * 10)
    assert len(api.get(f"/v1/monitors/{mon['id']}/alerts").json()["data"]) == 2
    stats = api.get(f"/v1/monitors/{mon['id']}/stats", params={"limit": 4}).json()
    assert len(stats["data"]) == 4 and stats["has_more"]
    rest = api.get(
        f"/v1/monitors/{mon['id']}/stats", params={"cursor": stats["next_cursor"]}
    ).json()
    oldest_first = got["history"][:2]
    assert [s["id"] for s in rest["data"]] == [oldest_first[1]["id"], oldest_first[0]["id"]]


def test_a_rise_alerts_against_the_previous_window(api: TestClient, mon_settings: Settings) -> None:
    mon = api.post(
        "/v1/monitors",
        json=body(window={"items": 5}, rule={"rise_above": 0.5, "min_items": 5}),
    ).json()
    for labels in (["positive"] * 5, ["negative"] * 2 + ["positive"] * 3, ["negative"] * 5):
        batch = feed(api, mon["id"], [f"t{i}" for i in range(5)])
        classify(mon_settings, batch.json()["job_id"], labels)
    got = api.get(f"/v1/monitors/{mon['id']}").json()
    assert [s["alerted"] for s in got["history"]] == [False, False, True]
    assert got["history"][2]["previous_share"] == pytest.approx(0.4)
    (alert,) = api.get(f"/v1/monitors/{mon['id']}/alerts").json()["data"]
    assert "rose from 40% to 100%" in alert["reason"]


def test_bad_batches_are_refused(api: TestClient) -> None:
    mon = api.post("/v1/monitors", json=body()).json()
    assert api.post(f"/v1/monitors/{mon['id']}/items", json={"texts": []}).status_code == 422
    assert feed(api, mon["id"], ["x"] * 257).status_code == 422
    assert feed(api, mon["id"], [""]).status_code == 422
    assert feed(api, "mon_missing", ["x"]).status_code == 404
    assert api.get(f"/v1/monitors/{mon['id']}").json()["items"]["posted"] == 0


def test_another_tenant_sees_no_monitor(api: TestClient, mon_settings: Settings) -> None:
    mon = api.post("/v1/monitors", json=body()).json()
    other = bearer(make_key(mon_settings.database_url, tenant="monitor-other"))
    for method, path in [
        ("GET", f"/v1/monitors/{mon['id']}"),
        ("GET", f"/v1/monitors/{mon['id']}/stats"),
        ("GET", f"/v1/monitors/{mon['id']}/alerts"),
        ("DELETE", f"/v1/monitors/{mon['id']}"),
    ]:
        assert api.request(method, path, headers=other).status_code == 404
    resp = api.post(f"/v1/monitors/{mon['id']}/items", json={"texts": ["x"]}, headers=other)
    assert resp.status_code == 404
    assert api.get("/v1/monitors", headers=other).json()["data"] == []
    # the installed model is shared, but another tenant's registered model is not
    assert api.post("/v1/monitors", json=body(), headers=other).status_code == 201
    reader = bearer(make_key(mon_settings.database_url, scopes=("jobs:read",)))
    assert api.post("/v1/monitors", json=body(), headers=reader).status_code == 403
    assert api.delete(f"/v1/monitors/{mon['id']}").status_code == 204
    assert api.get(f"/v1/monitors/{mon['id']}").status_code == 404


def test_jobs_cannot_subscribe_to_monitor_alerts(api: TestClient) -> None:
    resp = api.post(
        "/v1/jobs",
        json={"kind": "noop", "spec": {}, "webhook_url": HOOK, "webhook_events": ["alert"]},
    )
    assert resp.status_code == 422
    assert "monitor event" in resp.json()["error"]["message"]


def test_a_time_window_counts_the_recent_items(api: TestClient, mon_settings: Settings) -> None:
    mon = api.post(
        "/v1/monitors",
        json=body(window={"seconds": 3600}, rule={"share_above": 0.5, "min_items": 4}),
    ).json()
    assert mon["window"] == {"items": None, "seconds": 3600}
    for labels in (["positive"] * 4, ["negative"] * 6):
        batch = feed(api, mon["id"], [f"t{i}" for i in range(len(labels))])
        classify(mon_settings, batch.json()["job_id"], labels)
    got = api.get(f"/v1/monitors/{mon['id']}").json()
    assert [s["items"] for s in got["history"]] == [4, 10]
    assert got["current"]["negative_share"] == pytest.approx(0.6)
    assert got["current"]["previous_share"] is None
    assert got["state"] == "alerting"


def test_a_batch_of_a_deleted_monitor_is_ignored(api: TestClient, mon_settings: Settings) -> None:
    mon = api.post("/v1/monitors", json=body()).json()
    job_id = feed(api, mon["id"], ["late"]).json()["job_id"]
    assert api.delete(f"/v1/monitors/{mon['id']}").status_code == 204
    output = OutputRecord(0, 0, "negative", "prediction", 1, 0, {"label": "negative", "score": 1})
    with session_scope(mon_settings.database_url) as session:
        assert record_predictions(session, job_id, [output]) is None
