"""The generation engine in-process on the tiny GPT-2: batching never changes a result.

Real transformers and peft; no worker process. Requests join a running batch
through the engine's `more` hook, as jobs do on a worker.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.settings import Settings
from core.specs import GenerateSpec
from db.registry import register_model
from db.session import migrate, session_scope
from tests.conftest import TINY_MODEL
from tests.support.jobs import insert_job
from workers.generation.cache import ModelCache
from workers.generation.engine import GenerationEngine
from workers.generation.requests import GenerationRequest, RequestResult

Texts = list[tuple[int, int, str, str]]


@pytest.fixture(scope="module")
def settings(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data = tmp_path_factory.mktemp("data")
    shutil.copytree(tiny_model_dir, data / "models" / TINY_MODEL)
    s = Settings(data_dir=data, generation_max_batch=16, generation_poll_s=1e-4)
    migrate(s.database_url)
    return s


@pytest.fixture
def engine(settings: Settings) -> Iterator[GenerationEngine]:
    yield GenerationEngine(settings, "cpu", ModelCache(2**30))


def spec(**fields: Any) -> GenerateSpec:
    return GenerateSpec.model_validate({"model": TINY_MODEL, "prompts": ["The blue mug"], **fields})


def texts(result: RequestResult) -> Texts:
    assert result.error is None, result.error
    return [(t.prompt_index, t.sequence_index, t.text, t.finish_reason) for t in result.texts]


def run(
    engine: GenerationEngine,
    requests: list[GenerationRequest],
    joining: list[list[GenerationRequest]] | None = None,
    base: str | None = None,
) -> dict[str, RequestResult]:
    """Run `requests`; each later group in `joining` is handed over at the next `more` call."""
    results: dict[str, RequestResult] = {}
    pending = list(joining or [])

    def more(room: int) -> list[GenerationRequest]:
        return pending.pop(0) if pending else []

    entry, _ = engine.load(base or engine.base_of(TINY_MODEL)[0])
    engine.run(entry, requests, lambda r: results.__setitem__(r.key, r), more=more)
    return results


def alone(engine: GenerationEngine, s: GenerateSpec) -> Texts:
    return texts(run(engine, [GenerationRequest("alone", s)])["alone"])


MIXED = {
    "greedy-short": spec(temperature=0, max_new_tokens=9, prompts=["Fresh bread", "Our support"]),
    "greedy-penalty": spec(temperature=0, max_new_tokens=30, repetition_penalty=1.3),
    "seeded": spec(temperature=0.9, top_p=0.8, top_k=40, seed=7, num_return_sequences=3),
    "seeded-long": spec(
        temperature=1.3, seed=99, max_new_tokens=40, prompts=["Thank you for your patience"]
    ),
    "greedy-stop": spec(temperature=0, max_new_tokens=50, prompts=["The quarterly report"]),
}


def test_each_result_is_the_same_alone_and_inside_a_mixed_batch(engine: GenerationEngine) -> None:
    expected = {key: alone(engine, s) for key, s in MIXED.items()}
    keys = list(MIXED)
    first = [GenerationRequest(k, MIXED[k]) for k in keys[:2]]
    later = [[GenerationRequest(k, MIXED[k])] for k in keys[2:]]
    together = run(engine, first, joining=later)
    assert {k: texts(r) for k, r in together.items()} == expected
    assert engine.stats.joined_mid_batch >= 2  # they really joined a running batch
    assert engine.stats.peak_rows > 1


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine: GenerationEngine) -> None:
    s = spec(temperature=1.0, seed=3, num_return_sequences=4, max_new_tokens=12)
    a, b = alone(engine, s), alone(engine, s)
    other = alone(engine, s.model_copy(update={"seed": 4}))
    assert a == b
    assert a != other
    assert len({t for _, _, t, _ in a}) > 1  # the sequences of one prompt differ


def test_stop_strings_cut_and_stream_deltas_add_up_to_the_text(engine: GenerationEngine) -> None:
    full = alone(engine, spec(temperature=0, max_new_tokens=40))[0][2]
    stop = full[20:23]
    deltas: list[str] = []
    req = GenerationRequest(
        "s",
        spec(temperature=0, max_new_tokens=40, stop=[stop]),
        on_delta=lambda p, s, text: deltas.append(text),
    )
    (result,) = run(engine, [req]).values()
    out = texts(result)
    assert out[0][2] == full[: full.find(stop)]
    assert out[0][3] == "stop"
    assert "".join(deltas) == out[0][2]
    assert len(deltas) > 1


def test_a_stopped_request_leaves_and_the_others_finish_unchanged(
    engine: GenerationEngine,
) -> None:
    keep = spec(temperature=0, max_new_tokens=60, prompts=["Fresh bread", "Write a short"])
    expected = alone(engine, keep)
    stop = threading.Event()
    steps = {"n": 0}

    def progress(fraction: float, detail: dict[str, int]) -> None:
        steps["n"] += 1
        if steps["n"] == 5:
            stop.set()  # as the heartbeat does when the job is cancelled

    doomed = GenerationRequest(
        "doomed", spec(temperature=0, max_new_tokens=500), stop_event=stop, on_progress=progress
    )
    results = run(engine, [doomed, GenerationRequest("keep", keep)])
    assert results["doomed"].stopped and results["doomed"].texts == []
    assert texts(results["keep"]) == expected


def test_a_bad_request_fails_alone(engine: GenerationEngine) -> None:
    too_long = spec(prompts=["word " * 3000], max_new_tokens=2000)
    results = run(engine, [GenerationRequest("bad", too_long), GenerationRequest("ok", spec())])
    assert results["bad"].error_type == "invalid_spec"
    assert "context" in (results["bad"].error or "")
    assert len(texts(results["ok"])) == 1


def test_chat_messages_need_a_chat_template(engine: GenerationEngine) -> None:
    chat = GenerateSpec.model_validate(
        {"model": TINY_MODEL, "messages": [[{"role": "user", "content": "hi"}]]}
    )
    (result,) = run(engine, [GenerationRequest("c", chat)]).values()
    assert result.error_type == "invalid_spec"
    assert "chat template" in (result.error or "")


def test_model_cache_hits_and_evicts_by_budget(settings: Settings, tmp_path: Path) -> None:
    twin = tmp_path / "twin"
    shutil.copytree(settings.models_dir / TINY_MODEL, twin)
    cache = ModelCache(budget_bytes=1)  # room for one model at a time
    first, miss = cache.get(str(settings.models_dir / TINY_MODEL), "cpu")
    again, hit = cache.get(str(settings.models_dir / TINY_MODEL), "cpu")
    assert (miss.hit, hit.hit) == (False, True)
    assert again is first
    _, other = cache.get(str(twin), "cpu")
    assert other.evicted == (str(settings.models_dir / TINY_MODEL),)
    assert (cache.hits, cache.misses, cache.evictions) == (1, 2, 1)


# --- LoRA adapters from the registry, mixed in one batch ----------------------------------


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=4, lora_alpha=32, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(8.0)  # big enough to change greedy text
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def plain_peft_greedy(base_dir: Path, adapter_dir: Path, prompt: str, n: int) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return str(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def test_two_adapters_and_the_base_in_one_batch(settings: Settings) -> None:
    base_dir = settings.models_dir / TINY_MODEL
    names = []
    for seed in (1, 2):
        rel = f"models/adapter-{seed}"
        make_adapter(base_dir, settings.data_dir / rel, seed)
        name = f"ft:{TINY_MODEL}:a{seed}:0000000{seed}"
        with session_scope(settings.database_url) as session:
            register_model(
                session,
                name=name,
                base_model=TINY_MODEL,
                task="causal_lm",
                method="lora",
                adapter=True,
                job_id=insert_job(settings.database_url),
                path=rel,
                labels=[],
                metrics={},
            )
        names.append(name)
    engine = GenerationEngine(settings, "cpu", ModelCache(2**30))
    prompt, n = "The blue mug", 15
    reqs = [
        GenerationRequest(key, spec(model=model, temperature=0, max_new_tokens=n, prompts=[prompt]))
        for key, model in [("a1", names[0]), ("base", TINY_MODEL), ("a2", names[1])]
    ]
    results = run(engine, reqs, base=str(base_dir))
    got = {k: texts(r)[0][2] for k, r in results.items()}
    assert got["a1"] == plain_peft_greedy(
        base_dir, settings.data_dir / "models/adapter-1", prompt, n
    )
    assert got["a2"] == plain_peft_greedy(
        base_dir, settings.data_dir / "models/adapter-2", prompt, n
    )
    assert (
        got["base"]
        == alone(GenerationEngine(settings, "cpu", ModelCache(2**30)), reqs[1].spec)[0][2]
    )
    assert len(set(got.values())) == 3  # each adapter really changed the text
