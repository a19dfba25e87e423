"""Tracking through the API: GET /v1/jobs/{id}/tensorboard gives a fine-tune's event files,
one run per attempt, as one .tar.gz that `modelyard tensorboard` unpacks (a typed 404 when
there are none); a job asking for MLflow where the deployment has no server is refused."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from core.enums import JobKind
from core.job_layout import attempt_dir, job_dir
from core.settings import Settings
from db.jobs import create_job
from db.models import DEFAULT_TENANT, Job
from db.session import migrate, session_scope
from modelyard.cli_jobs import unpack_tensorboard
from tests.support.auth import bearer, make_key

BACKENDS = ["sqlite"]  # files on disk; the job lookup is the shared require_job


def _finetune(settings: Settings, attempts: int) -> str:
    migrate(settings.database_url)
    with session_scope(settings.database_url) as s:
        job = create_job(s, kind=JobKind.FINETUNE, spec={}, priority=0, max_attempts=3, metadata={})
        s.execute(update(Job).where(Job.id == job.id).values(attempts=attempts))
        return job.id


def _event_file(settings: Settings, job_id: str, attempt: int, body: bytes) -> None:
    folder = attempt_dir(job_dir(settings, job_id, DEFAULT_TENANT), attempt) / "tensorboard"
    folder.mkdir(parents=True)
    (folder / f"events.out.tfevents.{attempt}.host").write_bytes(body)


def test_every_attempts_event_files_come_as_one_archive(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    job_id = _finetune(settings, attempts=3)
    _event_file(settings, job_id, 1, b"first")
    _event_file(settings, job_id, 3, b"third")  # attempt 2 wrote none (killed at once)

    answer = client.get(f"/v1/jobs/{job_id}/tensorboard")

    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/gzip"
    assert f"{job_id}-tensorboard.tar.gz" in answer.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(answer.content), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == [
            "attempt-1/events.out.tfevents.1.host",
            "attempt-3/events.out.tfevents.3.host",
        ]
    unpack_tensorboard(answer.content, tmp_path / "runs")  # what `modelyard tensorboard` does
    assert (tmp_path / "runs" / "attempt-3" / "events.out.tfevents.3.host").read_bytes() == b"third"


def test_a_job_without_event_files_is_a_typed_404(client: TestClient, settings: Settings) -> None:
    job_id = _finetune(settings, attempts=1)

    answer = client.get(f"/v1/jobs/{job_id}/tensorboard")

    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["type"] == "not_found" and "tracking was off" in error["message"]


def test_another_tenants_job_is_404(client: TestClient, settings: Settings) -> None:
    job_id = _finetune(settings, attempts=1)
    _event_file(settings, job_id, 1, b"secret")
    outsider = make_key(settings.database_url, ("admin",), tenant=f"t-{uuid.uuid4().hex[:6]}")

    answer = client.get(f"/v1/jobs/{job_id}/tensorboard", headers=bearer(outsider))

    assert answer.status_code == 404
    assert b"secret" not in answer.content


def test_unpacking_refuses_members_outside_the_folder(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("../escaped")
        member.size = 1
        tar.addfile(member, io.BytesIO(b"x"))

    with pytest.raises(tarfile.OutsideDestinationError):
        unpack_tensorboard(buffer.getvalue(), tmp_path / "runs")
    assert not (tmp_path / "escaped").exists()


def test_a_job_asking_for_mlflow_where_there_is_no_server_is_refused(
    client: TestClient, settings: Settings
) -> None:
    spec = {
        "base_model": "tiny-gpt2",
        "task": "causal_lm",
        "training_dataset": "ds_" + "0" * 32,
        "tracking": ["mlflow"],
    }
    before = client.get("/v1/jobs").json()["data"]

    answer = client.post("/v1/jobs", json={"kind": "finetune", "spec": spec})

    assert answer.status_code == 422, answer.text  # as every invalid_request
    error = answer.json()["error"]
    assert error["type"] == "invalid_request" and error["param"] == "spec.tracking"
    assert "MODELYARD_MLFLOW_TRACKING_URI" in error["message"]
    assert client.get("/v1/jobs").json()["data"] == before  # nothing was created
