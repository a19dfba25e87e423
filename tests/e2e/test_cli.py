"""The job commands of the `modelyard` CLI against a real stack: `watch` under a
pseudo-terminal draws a live progress bar and exits with the job's outcome."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL
from tests.support.harness import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# The HTTP and command-line surface is the same on every backend; the repositories under
# it run on SQLite and PostgreSQL in tests/api and tests/e2e/test_spine.py.
BACKENDS = ["postgresql"]


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args, "--url", stack.base_url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "120", "MODELYARD_API_KEY": stack.api_key},
    )


def cli_output(stack: Stack, *args: str) -> str:
    """What the command wrote, exactly: no newline translation (a generated text may hold
    a carriage return, which `text=True` would turn into a newline)."""
    done = subprocess.run(
        [sys.executable, "-m", "modelyard", *args, "--url", stack.base_url],
        capture_output=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "120", "MODELYARD_API_KEY": stack.api_key},
        check=True,
    )
    return done.stdout.decode()


def watch_in_a_terminal(stack: Stack, job_id: str) -> tuple[int, str]:
    """Run `modelyard watch` with a pseudo-terminal as stdout (rich draws live output
    only to terminals); returns its exit code and everything it wrote."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelyard",
            "watch",
            job_id,
            "--url",
            stack.base_url,
            "--interval",
            "0.2",
        ],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={
            **os.environ,
            "TERM": "xterm-256color",
            "COLUMNS": "120",
            "MODELYARD_API_KEY": stack.api_key,
        },
        close_fds=True,
    )
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process ended
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(30), b"".join(chunks).decode(errors="replace")


def test_watch_draws_a_live_bar_and_exits_0_on_success(one_worker: Stack) -> None:
    job = one_worker.submit({"duration_s": 2.5}, kind="noop")
    code, screen = watch_in_a_terminal(one_worker, job["id"])
    assert code == 0, screen
    assert "\x1b[" in screen  # drawn with terminal control sequences, i.e. live
    assert "━" in screen  # the bar
    assert "running" in screen and "100%" in screen
    assert f"{job['id']} succeeded" in screen
    worker_log = one_worker.workers[0].log.read_text(errors="replace")
    assert f"modelyard.noop {job['id']}" in worker_log  # the name Flower shows too


def test_watch_exit_code_tells_a_cancelled_job(one_worker: Stack) -> None:
    job = one_worker.submit({"duration_s": 60}, kind="noop")
    assert cli(one_worker, "cancel", job["id"]).returncode == 0
    done = cli(one_worker, "watch", job["id"], "--interval", "0.2")
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"{job['id']} cancelled")  # own line


def test_submit_jobs_outputs_and_refusals(one_worker: Stack) -> None:
    spec = {"model": TINY_MODEL, "prompts": ["The blue mug", "Thank you"], "max_new_tokens": 4}
    submitted = cli(one_worker, "submit", "generate", "--spec-json", json.dumps(spec))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.startswith("job_")
    waited = cli(one_worker, "watch", job_id, "--interval", "0.2", "--json")
    assert waited.returncode == 0 and json.loads(waited.stdout)["status"] == "succeeded"
    listed = json.loads(cli(one_worker, "jobs", "--kind", "generate", "--json").stdout)
    assert job_id in {j["id"] for j in listed["data"]}
    table = cli_output(one_worker, "outputs", job_id, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(table, newline="")))
    assert [(r["prompt_index"], r["sequence_index"]) for r in rows] == [("0", "0"), ("1", "0")]
    lines = cli(one_worker, "outputs", job_id).stdout.splitlines()
    assert [json.loads(line)["text"] for line in lines] == [r["text"] for r in rows]
    refused = cli(one_worker, "submit", "nonsense", "--spec-json", "{}")
    assert refused.returncode == 5
    assert "422" in refused.stderr
    missing = cli(one_worker, "show", "job_missing")
    assert missing.returncode == 5 and "not_found" in missing.stderr


def test_submit_from_a_yaml_file_with_flags_then_logs_and_datasets(
    one_worker: Stack, tmp_path: Path
) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(f"model: {TINY_MODEL}\nprompts:\n  - The blue mug\nmax_new_tokens: 8\n")
    submitted = cli(
        one_worker,
        "submit",
        "generate",
        "--spec",
        str(spec_file),
        "--set",
        "max_new_tokens=3",
        "--set",
        'stop=["zzz"]',
        "--metadata",
        "ticket=T-9",
        "--json",
    )
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["spec"]["max_new_tokens"] == 3 and job["spec"]["stop"] == ["zzz"]
    assert job["spec"]["prompts"] == ["The blue mug"] and job["metadata"] == {"ticket": "T-9"}
    followed = cli(one_worker, "logs", job["id"], "--json")
    assert followed.returncode == 0, followed.stderr
    seen = [json.loads(line) for line in followed.stdout.splitlines()]
    statuses = [e["data"]["status"] for e in seen if e["type"] == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded"
    bad = cli(one_worker, "submit", "generate", "--set", "no-equals-sign")
    assert bad.returncode == 2 and "key=value" in bad.stderr

    data = tmp_path / "reviews.csv"
    data.write_text("text,label\ngreat mug,pos\nbroken handle,neg\n")
    uploaded = cli(one_worker, "datasets", "upload", str(data))
    assert uploaded.returncode == 0, uploaded.stderr
    dataset_id = uploaded.stdout.strip()
    listed = json.loads(cli(one_worker, "datasets", "list", "--json").stdout)
    assert dataset_id in {d["id"] for d in listed["data"]}
    shown = json.loads(cli(one_worker, "datasets", "show", dataset_id).stdout)
    assert shown["rows"] == 2 and sorted(shown["labels"]) == ["neg", "pos"]
    assert cli(one_worker, "datasets", "delete", dataset_id).returncode == 0
    assert cli(one_worker, "datasets", "show", dataset_id).returncode == 5
    models = cli(one_worker, "models", "list", "--json")
    assert models.returncode == 0 and isinstance(json.loads(models.stdout)["data"], list)
    assert cli(one_worker, "models", "show", "no-such-model").returncode == 5
