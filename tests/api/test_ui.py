"""The dashboard's static pages and configuration, served by the API at /ui."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from api.routes.ui import UI_DIR
from core.enums import JobKind, JobStatus


def test_ui_redirects_to_its_page_with_a_strict_policy(client: TestClient) -> None:
    resp = client.get("/ui", follow_redirects=False)
    assert resp.status_code == 307
    assert resp.headers["location"] == "ui/"
    page = client.get("/ui/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert 'src="static/app.js"' in page.text
    assert 'href="#/playground"' in page.text


def test_ui_config_names_flower_and_the_filters(client: TestClient) -> None:
    config = client.get("/ui/config.json").json()
    assert config["flower_url"] == "http://127.0.0.1:5555"
    assert config["statuses"] == [s.value for s in JobStatus]
    assert config["kinds"] == [k.value for k in JobKind]


def test_ui_scripts_are_served_and_build_no_html_from_strings(client: TestClient) -> None:
    scripts = sorted((UI_DIR / "static").glob("*.js"))
    assert {p.name for p in scripts} >= {
        "app.js",
        "api.js",
        "charts.js",
        "chat.js",
        "dom.js",
        "job.js",
        "playground.js",
        "sse.js",
    }
    for path in scripts:
        resp = client.get(f"/ui/static/{path.name}")
        assert resp.status_code == 200
        assert "javascript" in resp.headers["content-type"]
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", resp.text)
    assert client.get("/ui/static/style.css").status_code == 200
    assert client.get("/ui/static/../index.html").status_code == 404


def test_ui_is_not_part_of_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]
