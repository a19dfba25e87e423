"""Fault 4 of issue 16: PostgreSQL unreachable for longer than the workers' `db_retry_s`,
once stopped (connections refused) and once black-holed (every packet dropped: nothing
refuses, a write just never comes back), while one worker trains a fine-tune and another
decodes a group of three generation jobs. Afterwards no job is left `running` and none has
failed for good because of the outage: a write the worker gave up on leaves the job to
its lease, and the reconciler gives it to another attempt.

tests/faults/test_outage_faults.py runs them; bench/faults.py puts them in the table."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.faults.scenarios import TINY_MODEL, Lab, Outcome, ended, finetune_spec, now, seconds
from tests.support.faults import Figures
from tests.support.harness import TERMINAL
from tests.support.services import packets_dropped

# Workers that give up on a write soon, and on a silent connection soon: the outage
# outlasts their retries several times over.
SHORT_RETRY = {"db_retry_s": "2", "database_connect_timeout_s": "2"}
PROMPTS = ("The blue mug", "Fresh bread", "Our support team")


@contextmanager
def unreachable(lab: Lab, how: str) -> Iterator[None]:
    """The lab's PostgreSQL `stopped` (fast shutdown: connections cut, new ones refused)
    or `blackholed` (running, but every packet to or from its port dropped)."""
    assert lab.pg is not None, "this scenario needs the lab's private PostgreSQL"
    if how == "stopped":
        lab.pg.stop()
        try:
            yield
        finally:
            lab.pg.start()
    elif how == "blackholed":
        with packets_dropped(lab.pg.port):
            yield
    else:
        raise ValueError(f"unknown outage {how!r}")


def postgres_outage(lab: Lab, how: str, down_s: float = 6.0, max_new_tokens: int = 1000) -> Outcome:
    """PostgreSQL `how` (see `unreachable`) for `down_s` while a fine-tune trains on one
    worker and three generation jobs decode as one group on the other, both workers with
    `db_retry_s` 2 s. Every job ends `succeeded`, whichever attempt finishes it."""
    lab.fleet(0)
    for _ in range(2):
        lab.special_worker(**SHORT_RETRY)
    dataset = lab.text_dataset()
    steps = max(400, int(down_s * 60))
    finetune = lab.submit("finetune", finetune_spec(dataset, steps, every=50))
    lab.wait_step(finetune["id"], 10, 120)
    generations = [
        lab.submit(
            "generate",
            {
                "model": TINY_MODEL,
                "prompts": [p],
                "temperature": 0,
                "max_new_tokens": max_new_tokens,
            },
        )
        for p in PROMPTS
    ]
    for job in generations:
        lab.wait(job["id"], ("running", *TERMINAL), 60)
    ids = [finetune["id"], *(j["id"] for j in generations)]
    decoding = {lab.job(j)["status"] for j in ids[1:]}
    went = now()
    with unreachable(lab, how):
        time.sleep(down_s)
    back = now()
    done = lab.settle(ids, 300)
    settled = now()
    found = lab.audit(ids)
    worker_logs = ""
    if any(j["status"] != "succeeded" for j in done.values()):
        worker_logs = lab.stack.logs()
    return Outcome(
        Figures.of(
            f"23{'a' if how == 'stopped' else 'b'}. PostgreSQL {how} {down_s:g}s (> db_retry_s 2s)"
            " mid fine-tune and mid decode group of 3",
            found,
            seconds(back, settled),
            note=f"{ended(found)}; recover: database back -> all finished",
        ),
        found,
        {
            "done": done,
            "ids": ids,
            "decoding_at_outage": decoding,
            "outage_s": seconds(went, back),
            "steps": steps,
            "metric_steps": lab.metric_steps(finetune["id"]),
            "outputs": {j: lab.stack.outputs(j) for j in ids[1:]},
            "logs": worker_logs,
        },
    )
