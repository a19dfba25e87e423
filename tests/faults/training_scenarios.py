"""Row 29 (issue 18): a fine-tune trained in two processes loses one to kill -9."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.faults.scenarios import Lab, Outcome, finetune_spec, now, seconds
from tests.support.faults import Figures, claimed_at
from tests.support.harness import TERMINAL, wait_for


def _control_dir(lab: Lab, job_id: str) -> Path:
    jobs = lab.stack.workdir / "data" / "tenants" / "default" / "jobs"
    return jobs / job_id / "attempts" / "1" / "control"


def kill_one_training_process(lab: Lab, steps: int = 300, every: int = 25) -> Outcome:
    """kill -9 rank 1 of a fine-tune that a `--procs 2` worker trains, half way between two
    checkpoints: torchrun ends rank 0, the attempt ends as a transient worker_lost, and the
    same worker resumes the job from its last checkpoint on attempt 2."""
    lab.fleet(0)
    worker = lab.special_worker(training_procs="2")
    job = lab.submit("finetune", finetune_spec(lab.text_dataset(), steps, every))
    job_id = job["id"]
    wait_for(lambda: lab.checkpoints(job_id), 240, "first checkpoint", 0.1)
    saved = max(lab.checkpoints(job_id))
    lab.wait_step(job_id, saved + every // 2, 120)
    pid_file = _control_dir(lab, job_id) / "pid-1"
    killed = now()
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    done = lab.wait(job_id, TERMINAL, 300)
    found = lab.audit([job_id])
    recover = seconds(killed, claimed_at(lab.database_url, job_id, killed))
    return Outcome(
        Figures.of("29. kill -9 one of a fine-tune's two training processes", found, recover),
        found,
        {"job": done, "saved": saved, "worker_alive": worker.alive()},
    )
