"""The generation runner in-process on the tiny GPT-2 (real transformers, no worker)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.enums import FailureType
from core.errors import JobStopped, PermanentJobError
from core.settings import Settings
from tests.conftest import TINY_MODEL
from workers.context import RunContext
from workers.generation.runner import GenerationRunner
from workers.generation.text import cut_at_stop


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> GenerationRunner:
    data = tmp_path_factory.mktemp("data")
    shutil.copytree(tiny_model_dir, data / "models" / TINY_MODEL)
    return GenerationRunner(Settings(data_dir=data))


def run(runner: GenerationRunner, **spec: object) -> list[tuple[int, int, str, str, int]]:
    merged: dict[str, object] = {"model": TINY_MODEL, "prompts": ["The blue mug"], **spec}
    ctx = RunContext(job_id="job_test", attempt=1, device="cpu")
    outs = runner.run(merged, ctx).outputs
    assert ctx.progress == 1.0
    return [
        (o.prompt_index, o.sequence_index, o.text, o.finish_reason, o.completion_tokens)
        for o in outs
    ]


def test_greedy_is_deterministic_and_counts_tokens(runner: GenerationRunner) -> None:
    first = run(runner, temperature=0, max_new_tokens=12, prompts=["The blue mug", "Fresh bread"])
    assert first == run(
        runner, temperature=0, max_new_tokens=12, prompts=["The blue mug", "Fresh bread"]
    )
    assert [(p, s) for p, s, *_ in first] == [(0, 0), (1, 0)]
    assert all(reason == "length" and n == 12 for *_, reason, n in first)


def test_seeded_sampling_is_reproducible_and_per_prompt(runner: GenerationRunner) -> None:
    a = run(runner, seed=11, num_return_sequences=3, max_new_tokens=10, prompts=["A", "B"])
    b = run(runner, seed=11, num_return_sequences=3, max_new_tokens=10, prompts=["A", "B"])
    c = run(runner, seed=12, num_return_sequences=3, max_new_tokens=10, prompts=["A", "B"])
    assert a == b
    assert a != c
    assert len(a) == 6
    # prompt 1's texts do not depend on prompt 0 being in the same job
    alone = run(runner, seed=11, num_return_sequences=3, max_new_tokens=10, prompts=["A"])
    assert [x[2] for x in alone] == [x[2] for x in a if x[0] == 0]


def test_stop_sequences_cut_the_text(runner: GenerationRunner) -> None:
    full = run(runner, temperature=0, max_new_tokens=40)[0][2]
    stop = full[5:8]
    cut = run(runner, temperature=0, max_new_tokens=40, stop=[stop])[0]
    assert cut[2] == full[: full.find(stop)]
    assert cut[3] == "stop"


def test_cut_at_stop_takes_the_earliest() -> None:
    assert cut_at_stop("abc. def\nghi", ["\n", "."]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_stop_event_ends_the_run(runner: GenerationRunner) -> None:
    ctx = RunContext(job_id="job_test", attempt=1, device="cpu")
    ctx.cancelled = True
    ctx.stop_event.set()
    with pytest.raises(JobStopped, match="cancelled"):
        runner.run({"model": TINY_MODEL, "prompts": ["x"], "max_new_tokens": 500}, ctx)


def test_unknown_model_is_a_permanent_failure(runner: GenerationRunner) -> None:
    ctx = RunContext(job_id="job_test", attempt=1, device="cpu")
    with pytest.raises(PermanentJobError) as info:
        runner.run({"model": "no-such-model-here", "prompts": ["x"]}, ctx)
    assert info.value.failure is FailureType.MODEL_NOT_FOUND


def test_chat_on_a_model_without_template_is_refused(runner: GenerationRunner) -> None:
    ctx = RunContext(job_id="job_test", attempt=1, device="cpu")
    with pytest.raises(PermanentJobError) as info:
        runner.run({"model": TINY_MODEL, "prompts": ["x"], "chat": True}, ctx)
    assert info.value.failure is FailureType.INVALID_SPEC
