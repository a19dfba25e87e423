"""The worker's side of training in child processes, without starting any: what the ranks'
outcomes make of the attempt, the control files, the settings the ranks get, and how the
batch is shared between processes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from core.enums import FailureType, JobKind
from core.errors import JobStopped, PermanentJobError, StaleAttempt, TransientJobError
from core.settings import Settings
from core.specs import Hyperparameters
from db.session import migrate, session_scope
from db.training import add_checkpoint
from tests.support.jobs import insert_job
from workers.context import RunContext
from workers.runners import RunResult
from workers.serve import devices_environment
from workers.training import launch
from workers.training.child import rank_device
from workers.training.control import ControlFiles, Outcome, StopRequest
from workers.training.launch import ChildProcessRunner, settings_payload
from workers.training.layout import CHECKPOINTS_DIR, attempt_dir, job_dir
from workers.training.schedule import per_device_batch, plan_schedule

MODEL_PATH = "/data/jobs/j/attempts/1/model"
MODEL = {
    "path": MODEL_PATH,
    "base_model": "tiny-gpt2",
    "task": "causal_lm",
    "method": "lora",
    "labels": [],
    "metrics": {"eval_loss": 1.5},
    "adapter": True,
}


@pytest.fixture
def control(tmp_path: Path) -> ControlFiles:
    files = ControlFiles(tmp_path / "control")
    files.reset()
    return files


def result_of(control: ControlFiles, returncode: int, procs: int = 2) -> RunResult:
    ctx = RunContext(job_id="job_1", attempt=1, device="cpu")
    runner = ChildProcessRunner(Settings(data_dir=control.root.parent))
    return runner._result(control, returncode, procs, ctx)


def test_rank_zero_succeeding_gives_the_result_and_model(control: ControlFiles) -> None:
    control.write_outcome(
        Outcome("succeeded", 0, result={"train": {"global_step": 3}}, model=MODEL)
    )
    control.write_outcome(Outcome("succeeded", 1))
    result = result_of(control, 0)
    assert result.trained_model is not None
    assert result.result == {"train": {"global_step": 3}}
    assert result.trained_model.path == Path(MODEL_PATH)
    assert result.trained_model.adapter is True
    assert result.trained_model.metrics == {"eval_loss": 1.5}


def test_a_rank_without_an_outcome_died_and_the_job_is_retried(control: ControlFiles) -> None:
    """Its peer's error (the collective it was in lost a member) follows from the death."""
    control.write_outcome(Outcome("failed", 0, failure="runtime_error", message="gloo reset"))
    with pytest.raises(TransientJobError) as raised:
        result_of(control, -9)
    assert raised.value.failure is FailureType.WORKER_LOST
    assert "rank 1" in raised.value.message and "SIGKILL" in raised.value.message


def test_the_first_failure_is_the_cause(control: ControlFiles) -> None:
    control.write_outcome(
        Outcome("failed", 1, failure="out_of_memory", message="CUDA out of memory", at=10.0)
    )
    control.write_outcome(Outcome("failed", 0, failure="runtime_error", message="reset", at=11.0))
    with pytest.raises(PermanentJobError) as raised:
        result_of(control, 1)
    assert raised.value.failure is FailureType.OUT_OF_MEMORY
    assert raised.value.message == "rank 1: CUDA out of memory"


def test_a_transient_failure_stays_transient(control: ControlFiles) -> None:
    control.write_outcome(Outcome("failed", 0, transient=True, failure="disk_full", message="x"))
    with pytest.raises(TransientJobError) as raised:
        result_of(control, 1, procs=1)
    assert raised.value.failure is FailureType.DISK_FULL


def test_a_refused_write_on_any_rank_means_the_lease_is_lost(control: ControlFiles) -> None:
    control.write_outcome(Outcome("stopped", 0, lease_lost=True))
    control.write_outcome(Outcome("failed", 1, failure="runtime_error", message="reset"))
    ctx = RunContext(job_id="job_1", attempt=1, device="cpu")
    runner = ChildProcessRunner(Settings(data_dir=control.root.parent))
    with pytest.raises(StaleAttempt):
        runner._result(control, 1, 2, ctx)
    assert ctx.lease_lost and ctx.stop_event.is_set()


def test_stopped_ranks_stop_the_attempt(control: ControlFiles) -> None:
    for rank in (0, 1):
        control.write_outcome(Outcome("stopped", rank))
    with pytest.raises(JobStopped) as raised:
        result_of(control, 1)
    assert not isinstance(raised.value, StaleAttempt)


def test_control_files_round_trip(control: ControlFiles) -> None:
    assert control.stop_request() is None and control.progress() is None
    control.ask_stop(StopRequest(paused=True))
    assert control.stop_request() == StopRequest(paused=True)
    control.write_progress(0.5, {"step": 5, "eta_s": 1.5})
    assert control.progress() == (0.5, {"step": 5, "eta_s": 1.5})
    control.write_pid(0, 123)
    control.write_pid(1, 456)
    assert sorted(control.pids()) == [123, 456]
    (control.root / "outcome-7").write_text("{half")  # unreadable: skipped, not raised
    assert control.outcomes() == {}
    control.reset()
    assert list(control.root.iterdir()) == []


def test_the_ranks_get_the_workers_settings_secrets_included(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        training_procs=3,
        flower_password=SecretStr("a-long-password"),
        storage_options={"endpoint_url": "http://10.0.0.1:9000"},
    )
    again = Settings(**settings_payload(settings))
    assert again == settings
    assert again.flower_password is not None
    assert again.flower_password.get_secret_value() == "a-long-password"


@pytest.mark.parametrize(
    ("device", "local_rank", "world", "expected"),
    [
        ("cpu", 1, 2, "cpu"),
        ("cuda", 1, 2, "cuda:1"),
        ("cuda:3", 0, 1, "cuda:3"),
    ],
)
def test_each_rank_gets_its_device(device: str, local_rank: int, world: int, expected: str) -> None:
    assert rank_device(device, local_rank, world) == expected


@pytest.mark.parametrize(("batch", "world", "each"), [(8, 1, 8), (8, 2, 4), (9, 2, 5), (1, 4, 1)])
def test_the_batch_is_the_steps_and_each_process_takes_its_share(
    batch: int, world: int, each: int
) -> None:
    assert per_device_batch(batch, world) == each


def test_two_processes_take_as_many_steps_as_one() -> None:
    hp = Hyperparameters(batch_size=8, epochs=2)
    one = plan_schedule(hp, 100)
    two = plan_schedule(hp, 100, world_size=2)
    assert one.total_steps == two.total_steps == 2 * math.ceil(100 / 8)


def test_a_worker_given_gpus_owns_them_and_trains_across_all() -> None:
    assert devices_environment(["2", "3"]) == {
        "CUDA_VISIBLE_DEVICES": "2,3",
        "MODELYARD_DEVICE": "cuda",
        "MODELYARD_TRAINING_PROCS": "2",
    }
    assert devices_environment(["0", "1", "2", "3"], procs=2)["MODELYARD_TRAINING_PROCS"] == "2"


def test_the_worker_command_offers_the_training_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.serve", "worker", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    for option in ("--procs", "--gpus", "--worker-per-gpu"):
        assert option in done.stdout


def test_ranks_that_ignore_a_stop_request_are_killed_after_half_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in for torchrun that never looks at the stop request (stuck in a C call,
    a hung collective) and has started a process of its own: both are gone soon after
    `stop_grace_s / 2`, and the attempt ends stopped."""
    pid_file = tmp_path / "grandchild"
    stubborn = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(600)\n"
    )
    monkeypatch.setattr(
        launch, "torchrun_command", lambda procs, control: [sys.executable, "-c", stubborn]
    )
    settings = Settings(data_dir=tmp_path, stop_grace_s=1.0, training_procs=2)  # torchrun
    ctx = RunContext(job_id="job_1", attempt=1, device="cpu")

    def cancel() -> None:
        ctx.cancelled = True
        ctx.stop_event.set()

    threading.Timer(1.0, cancel).start()
    started = time.monotonic()
    with pytest.raises(JobStopped):
        ChildProcessRunner(settings).run({}, ctx)
    assert time.monotonic() - started < 10
    asked = launch.control_files(settings, ctx).stop_request()
    assert asked == StopRequest(cancelled=True)
    grandchild = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # killed with its process group; reaped by init
            os.kill(grandchild, 0)
            time.sleep(0.1)


def test_a_dead_attempts_checkpoints_without_a_row_are_removed(tmp_path: Path) -> None:
    """torchrun ends rank 0 wherever it is when rank 1 dies, between renaming a checkpoint
    into place and writing its row included (fault row 29 caught one): once the ranks have
    ended, what no row names goes, and what rows name stays."""
    database_url = f"sqlite:///{tmp_path / 'modelyard.db'}"
    migrate(database_url)
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    job_id = insert_job(database_url, kind=JobKind.FINETUNE)
    ctx = RunContext(job_id=job_id, attempt=2, device="cpu", tenant_id="default")
    run_dir = attempt_dir(job_dir(settings, job_id, "default"), 2) / CHECKPOINTS_DIR
    for name in ("checkpoint-20", "checkpoint-40", "checkpoint-60", ".staging"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "rng_state_1.pth").write_bytes(b"x")
    earlier = attempt_dir(job_dir(settings, job_id, "default"), 1) / CHECKPOINTS_DIR
    (earlier / "checkpoint-60").mkdir(parents=True)  # another attempt's: not this one's to sweep
    with session_scope(database_url) as s:
        for step in (20, 40):
            path = (run_dir / f"checkpoint-{step}").relative_to(settings.data_dir.resolve())
            add_checkpoint(s, job_id, step, str(path), {})

    launch.remove_unrecorded_checkpoints(settings, ctx)

    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-20", "checkpoint-40"]
    assert (earlier / "checkpoint-60").is_dir()


def test_without_the_database_the_sweep_keeps_everything(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite:///" + str(tmp_path))
    ctx = RunContext(job_id="job_1", attempt=1, device="cpu", tenant_id="default")
    run_dir = attempt_dir(job_dir(settings, "job_1", "default"), 1) / CHECKPOINTS_DIR
    (run_dir / "checkpoint-5").mkdir(parents=True)

    launch.remove_unrecorded_checkpoints(settings, ctx)  # the URL names a directory: no database

    assert (run_dir / "checkpoint-5").is_dir()
