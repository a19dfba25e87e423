"""One fine-tune across two processes (`modelyard worker --procs 2`: torchrun, DDP over
gloo): it trains and registers a model that serves, a cancel stops both ranks after the
same step, the one in which they saw it, and a pause rests both at one checkpoint that
resume goes on from (issue 18). A kill -9 of one of the processes is fault row 29
(tests/faults/test_training_faults.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_MODEL
from tests.e2e.test_finetune import metric_values, submit, upload
from tests.support.datasets import write_prompt_completion_jsonl, write_text_jsonl
from tests.support.harness import Proc, Stack, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BACKENDS = ["postgresql"]  # the processes' fenced writes; the database paths run on both elsewhere
DONE = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def two_procs(stack: Stack) -> Iterator[Stack]:
    """The stack's only worker trains each fine-tune in two processes."""
    stack.stop_workers()
    stack.workers.clear()
    worker: Proc = stack.start_worker(env={"MODELYARD_TRAINING_PROCS": "2"})
    yield stack
    worker.stop()


def finetune(stack: Stack, tmp_path: Path, extra: dict[str, Any] | None = None, **hp: Any) -> str:
    spec = {
        "base_model": TINY_MODEL,
        "task": "causal_lm",
        "training_dataset": upload(stack, write_text_jsonl(tmp_path / "train.jsonl", rows=200)),
        "hyperparameters": {"batch_size": 8, "learning_rate": 1e-3, "seed": 5, **hp},
        **(extra or {}),
    }
    job_id: str = submit(stack, "finetune", spec)["id"]
    return job_id


def control_dir(stack: Stack, job_id: str, attempt: int) -> Path:
    found = list((stack.workdir / "data").rglob(f"jobs/{job_id}/attempts/{attempt}/control"))
    assert len(found) == 1, found
    return found[0]


def outcomes(control: Path) -> dict[int, dict[str, Any]]:
    return {int(p.name.split("-")[1]): json.loads(p.read_text()) for p in control.glob("outcome-*")}


def step_of(stack: Stack, job_id: str) -> int:
    return int((stack.job(job_id).get("progress_detail") or {}).get("step", 0))


def test_two_processes_train_a_model_that_serves(two_procs: Stack, tmp_path: Path) -> None:
    pairs = upload(two_procs, write_prompt_completion_jsonl(tmp_path / "pc.jsonl", rows=200))
    exact_match = {"examples": 7, "max_new_tokens": 2}  # rank 0 scores 4 rows, rank 1 3
    extra = {"training_dataset": pairs, "exact_match": exact_match}
    job_id = finetune(two_procs, tmp_path, extra, max_steps=30, eval_steps=15)
    done = two_procs.wait_status(job_id, DONE, timeout=300)
    assert done["status"] == "succeeded", f"{done}\n{two_procs.logs()}"
    assert done["attempts"] == 1
    started = next(e for e in two_procs.events(job_id) if e["message"] == "training started")
    assert started["data"]["processes"] == 2
    ranks = outcomes(control_dir(two_procs, job_id, 1))
    assert {r: o["status"] for r, o in ranks.items()} == {0: "succeeded", 1: "succeeded"}
    assert done["result"]["train"]["global_step"] == 30
    # both ranks loaded the same best checkpoint at the end (rank 0 saved it)
    assert done["result"]["best_checkpoint"]["step"] in (15, 30)
    # exact match over 7 held-out prompts, whose shared 2-token completion the model learns
    # (1.0 in one process): rank 0 scores 4 of them and rank 1 the other 3, so a share
    # above 4/7 is both ranks' counts summed
    shares = metric_values(two_procs, job_id, "eval_exact_match")
    final = done["result"]["eval"]["exact_match"]
    assert len(shares) == 2
    assert all(round(7 * share, 6) == round(7 * share) for share in [*shares, final])
    assert final > 4 / 7
    # trained tokens count both ranks' rows: 8 a step (4 each; an epoch's last step may hold
    # fewer), where one rank's count would be half
    with two_procs.client() as c:
        report = c.get(
            f"/v1/datasets/{done['spec']['training_dataset']}/tokens", params={"model": TINY_MODEL}
        ).json()
    assert report["truncated"] == 0
    trained = done["result"]["trained_tokens"]
    assert (30 - 1) * 8 * report["min_tokens"] <= trained <= 30 * 8 * report["max_tokens"]
    gen = submit(
        two_procs,
        "generate",
        {"model": done["result"]["model"], "prompts": ["to be"], "max_new_tokens": 4},
    )["id"]
    served = two_procs.wait_status(gen, DONE, timeout=120)
    assert served["status"] == "succeeded", served
    assert two_procs.outputs(gen)[0]["completion_tokens"] > 0


def test_cancel_stops_both_processes_after_the_step_they_saw_it(
    two_procs: Stack, tmp_path: Path
) -> None:
    job_id = finetune(two_procs, tmp_path, max_steps=5000, checkpoint_steps=4000, eval_steps=4000)
    wait_for(lambda: step_of(two_procs, job_id) >= 3, 240, "training under way", 0.1)
    with two_procs.client() as c:
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    done = two_procs.wait_status(job_id, DONE, timeout=60)
    assert done["status"] == "cancelled", done
    ranks = outcomes(control_dir(two_procs, job_id, 1))
    assert sorted(ranks) == [0, 1]
    assert all(o["status"] == "stopped" for o in ranks.values()), ranks
    stopped = {o["extra"]["stopped_at"] for o in ranks.values()}
    assert len(stopped) == 1, ranks  # both ranks left after the same step
    seen = [o["extra"]["stop_seen_at"] for o in ranks.values() if o["extra"]["stop_seen_at"]]
    assert seen and stopped.pop() == min(seen), ranks  # the step the first rank saw it in
    with two_procs.client() as c:
        kept = c.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert [k["step"] for k in kept] == [ranks[0]["extra"]["stopped_at"]]


def test_pause_rests_both_processes_at_a_checkpoint_and_resume_goes_on(
    two_procs: Stack, tmp_path: Path
) -> None:
    job_id = finetune(two_procs, tmp_path, max_steps=80, checkpoint_steps=1000, eval_steps=1000)
    wait_for(lambda: step_of(two_procs, job_id) >= 3, 240, "training under way", 0.1)
    with two_procs.client() as c:
        assert c.post(f"/v1/jobs/{job_id}/pause").status_code == 202
    paused = two_procs.wait_status(job_id, ("paused", *DONE), timeout=60)
    assert paused["status"] == "paused", paused
    ranks = outcomes(control_dir(two_procs, job_id, 1))
    rested = ranks[0]["extra"]["stopped_at"]
    assert {o["extra"]["stopped_at"] for o in ranks.values()} == {rested}
    with two_procs.client() as c:
        kept = [k["step"] for k in c.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]]
        assert kept == [rested]
        assert c.post(f"/v1/jobs/{job_id}/resume").status_code == 202
    done = two_procs.wait_status(job_id, DONE, timeout=300)
    assert done["status"] == "succeeded", f"{done}\n{two_procs.logs()}"
    assert done["result"]["resumed_from_step"] == rested
    assert done["result"]["train"]["global_step"] == 80
