"""The transformers generation engine in-process on the tiny GPT-2, driven step by step as
the decode group runner drives it: decoding together never changes a result.

Real transformers and peft; no worker process. Requests join a running decode group by
being added between steps.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from core.enums import FailureType
from core.errors import PermanentJobError
from core.settings import Settings
from core.specs import GenerateSpec
from tests.conftest import TINY_MODEL
from tests.support.generation import engine_settings, register_adapter
from workers.generation.cache import ModelCache
from workers.generation.engine import TransformersEngine, base_of, open_engine
from workers.generation.requests import FailedRequest, FinishedRequest, GenerationRequest
from workers.generation.text import cut_at_stop

Texts = list[tuple[int, int, str, str]]
Ended = FinishedRequest | FailedRequest


@pytest.fixture(scope="module")
def settings(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return engine_settings(tiny_model_dir, tmp_path_factory.mktemp("data"))


def new_engine(settings: Settings, base: str | None = None) -> TransformersEngine:
    engine, _ = open_engine(
        settings, "cpu", base or base_of(settings, TINY_MODEL)[0], cache=ModelCache(2**30)
    )
    return engine


@pytest.fixture
def engine(settings: Settings) -> Iterator[TransformersEngine]:
    yield new_engine(settings)


def spec(**fields: Any) -> GenerateSpec:
    return GenerateSpec.model_validate({"model": TINY_MODEL, "prompts": ["The blue mug"], **fields})


def texts(result: Ended) -> Texts:
    assert isinstance(result, FinishedRequest), result
    return [(t.prompt_index, t.sequence_index, t.text, t.finish_reason) for t in result.texts]


def run(
    engine: TransformersEngine,
    requests: list[GenerationRequest],
    joining: list[list[GenerationRequest]] | None = None,
) -> dict[str, Ended]:
    """Step until done; each later group in `joining` is added after the next step."""
    ended: dict[str, Ended] = {}
    pending = list(joining or [])
    for r in requests:
        engine.add(r)
    while engine.has_work:
        out = engine.step()
        for f in [*out.finished, *out.failed]:
            assert f.key not in ended  # a request ends once
            ended[f.key] = f
        if pending:
            for r in pending.pop(0):
                engine.add(r)
    assert not engine.active
    return ended


def alone(engine: TransformersEngine, s: GenerateSpec) -> Texts:
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


def test_each_result_is_the_same_alone_and_inside_a_mixed_group(
    engine: TransformersEngine,
) -> None:
    expected = {key: alone(engine, s) for key, s in MIXED.items()}
    keys = list(MIXED)
    first = [GenerationRequest(k, MIXED[k]) for k in keys[:2]]
    later = [[GenerationRequest(k, MIXED[k])] for k in keys[2:]]
    together = run(engine, first, joining=later)
    assert {k: texts(r) for k, r in together.items()} == expected
    assert engine.stats.joined_mid_group >= 2  # they really joined a running decode group
    assert engine.stats.peak_sequences > 1


def test_a_burst_is_prefilled_in_chunks_of_the_token_budget_with_unchanged_texts(
    settings: Settings, engine: TransformersEngine
) -> None:
    expected = {key: alone(engine, s) for key, s in MIXED.items()}
    chunked = new_engine(settings.model_copy(update={"generation_prefill_tokens": 8}))
    for key, s in MIXED.items():
        chunked.add(GenerationRequest(key, s))
    rows = sum(len(s.prompts) * s.num_return_sequences for s in MIXED.values())
    chunked.step()
    # the prompts are 2-5 tokens: at most 8 padded tokens go in a step, and never none
    assert 1 <= chunked.stats.admitted <= 4 < rows
    ended: dict[str, Ended] = {}
    while chunked.has_work:
        out = chunked.step()
        ended.update({f.key: f for f in [*out.finished, *out.failed]})
    assert chunked.stats.admitted == rows
    assert {k: texts(r) for k, r in ended.items()} == expected


def test_a_prompt_longer_than_the_budget_is_still_admitted_alone(settings: Settings) -> None:
    chunked = new_engine(settings.model_copy(update={"generation_prefill_tokens": 1}))
    chunked.add(GenerationRequest("a", spec(temperature=0, max_new_tokens=3)))
    chunked.add(GenerationRequest("b", spec(temperature=0, max_new_tokens=3)))
    chunked.step()
    assert chunked.stats.admitted == 1
    chunked.step()
    assert chunked.stats.admitted == 2


def test_penalised_requests_give_their_alone_texts_in_a_mixed_group(
    engine: TransformersEngine,
) -> None:
    penalised = {
        "presence": spec(temperature=0, max_new_tokens=30, presence_penalty=2.0),
        "frequency": spec(temperature=0.8, seed=4, max_new_tokens=25, frequency_penalty=1.0),
        "both": spec(temperature=0, max_new_tokens=12, frequency_penalty=-1, presence_penalty=1),
        "plain": spec(temperature=0, max_new_tokens=30),
    }
    expected = {key: alone(engine, s) for key, s in penalised.items()}
    assert expected["presence"] != expected["plain"]
    keys = list(penalised)
    together = run(
        engine,
        [GenerationRequest(k, penalised[k]) for k in keys[:2]],
        joining=[[GenerationRequest(k, penalised[k])] for k in keys[2:]],
    )
    assert {k: texts(r) for k, r in together.items()} == expected


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine: TransformersEngine) -> None:
    s = spec(temperature=1.0, seed=3, num_return_sequences=4, max_new_tokens=12)
    a, b = alone(engine, s), alone(engine, s)
    other = alone(engine, s.model_copy(update={"seed": 4}))
    assert a == b
    assert a != other
    assert len({t for _, _, t, _ in a}) > 1  # the sequences of one prompt differ


def test_stop_strings_cut_and_stream_deltas_add_up_to_the_text(engine: TransformersEngine) -> None:
    full = alone(engine, spec(temperature=0, max_new_tokens=40))[0][2]
    stop = full[20:23]
    deltas: list[str] = []
    engine.add(GenerationRequest("s", spec(temperature=0, max_new_tokens=40, stop=[stop]), True))
    while engine.has_work:
        step = engine.step()
        deltas += [d.text for d in step.deltas if (d.key, d.prompt_index) == ("s", 0)]
        if step.finished:
            (result,) = step.finished
    out = texts(result)
    assert out[0][2] == full[: full.find(stop)]
    assert out[0][3] == "stop"
    assert "".join(deltas) == out[0][2]
    assert len(deltas) > 1


def test_no_deltas_unless_asked(engine: TransformersEngine) -> None:
    engine.add(GenerationRequest("quiet", spec(temperature=0, max_new_tokens=8)))
    while engine.has_work:
        assert engine.step().deltas == []


def test_cut_at_stop_takes_the_earliest() -> None:
    assert cut_at_stop("abc. def\nghi", ["\n", "."]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_a_cancelled_request_leaves_and_the_others_finish_unchanged(
    engine: TransformersEngine,
) -> None:
    keep = spec(temperature=0, max_new_tokens=60, prompts=["Fresh bread", "Write a short"])
    expected = alone(engine, keep)
    engine.add(GenerationRequest("doomed", spec(temperature=0, max_new_tokens=500)))
    engine.add(GenerationRequest("keep", keep))
    for _ in range(5):
        assert engine.step().finished == []
    assert engine.cancel("doomed")
    assert not engine.cancel("doomed")  # it is gone
    assert engine.active == ["keep"]
    ended = run(engine, [])
    assert list(ended) == ["keep"]
    assert texts(ended["keep"]) == expected


def test_a_bad_request_is_refused_alone(engine: TransformersEngine) -> None:
    too_long = spec(prompts=["word " * 3000], max_new_tokens=2000)
    with pytest.raises(PermanentJobError, match="context") as info:
        engine.add(GenerationRequest("bad", too_long))
    assert info.value.failure is FailureType.INVALID_SPEC
    assert not engine.has_work
    assert len(texts(run(engine, [GenerationRequest("ok", spec())])["ok"])) == 1


def test_chat_messages_need_a_chat_template(engine: TransformersEngine) -> None:
    chat = GenerateSpec.model_validate(
        {"model": TINY_MODEL, "messages": [[{"role": "user", "content": "hi"}]]}
    )
    with pytest.raises(PermanentJobError, match="chat template") as info:
        engine.add(GenerationRequest("c", chat))
    assert info.value.failure is FailureType.INVALID_SPEC


def test_an_unknown_model_is_a_permanent_failure(settings: Settings) -> None:
    with pytest.raises(PermanentJobError) as info:
        open_engine(settings, "cpu", base_of(settings, "no-such-model-here")[0], ModelCache(2**30))
    assert info.value.failure is FailureType.MODEL_NOT_FOUND


class RowLimitedModel:
    """The tiny model, out of memory for any forward over more than `limit` sequences (as a
    GPU runs out of memory when a decode group grows)."""

    def __init__(self, model: Any, limit: int) -> None:
        self._model = model
        self.limit = limit

    def __call__(self, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (test limit)")
        return self._model(**kwargs)

    def __getattr__(self, name: str) -> Any:  # config, embeddings: the real model's
        return getattr(self._model, name)


def test_out_of_memory_fails_the_newest_request_alone(settings: Settings) -> None:
    engine = new_engine(settings)
    first = spec(temperature=0, max_new_tokens=40, prompts=["The quarterly report"])
    seeded = spec(temperature=1.0, seed=5, max_new_tokens=30, prompts=["Our support"])
    expected = {"first": alone(engine, first), "seeded": alone(engine, seeded)}
    entry = engine._entry
    limited = TransformersEngine(
        settings,
        "cpu",
        engine._cache,
        replace(entry, model=RowLimitedModel(entry.model, limit=2)),
        engine.base,
    )
    engine = limited
    engine.add(GenerationRequest("first", first))
    engine.add(GenerationRequest("seeded", seeded))
    engine.step()
    # admitting 4 sequences at once runs out of memory: that request fails, the others go on
    engine.add(GenerationRequest("wide", spec(prompts=["a", "b", "c", "d"], max_new_tokens=5)))
    out = engine.step()
    assert [f.key for f in out.failed] == ["wide"]
    assert isinstance(out.failed[0].error, torch.OutOfMemoryError)
    # one more sequence admits (a prefill of 1), but the step over all 3 runs out of memory
    engine.add(GenerationRequest("late", spec(max_new_tokens=20)))
    out = engine.step()
    assert [f.key for f in out.failed] == ["late"]
    ended = run(engine, [])
    assert {k: texts(v) for k, v in ended.items()} == expected


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


# --- LoRA adapters from the registry, mixed in one decode group ----------------------------------


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


def test_two_adapters_and_the_base_in_one_decode_group(settings: Settings) -> None:
    base_dir = settings.models_dir / TINY_MODEL
    names = []
    for seed in (1, 2):
        rel = f"models/adapter-{seed}"
        make_adapter(base_dir, settings.data_dir / rel, seed)
        name = f"ft:{TINY_MODEL}:a{seed}:0000000{seed}"
        register_adapter(settings, name, rel)
        names.append(name)
    engine = new_engine(settings, str(base_dir))
    prompt, n = "The blue mug", 15
    reqs = [
        GenerationRequest(key, spec(model=model, temperature=0, max_new_tokens=n, prompts=[prompt]))
        for key, model in [("a1", names[0]), ("base", TINY_MODEL), ("a2", names[1])]
    ]
    results = run(engine, reqs)
    got = {k: texts(r)[0][2] for k, r in results.items()}
    assert got["a1"] == plain_peft_greedy(
        base_dir, settings.data_dir / "models/adapter-1", prompt, n
    )
    assert got["a2"] == plain_peft_greedy(
        base_dir, settings.data_dir / "models/adapter-2", prompt, n
    )
    assert got["base"] == alone(new_engine(settings, str(base_dir)), reqs[1].spec)[0][2]
    assert len(set(got.values())) == 3  # each adapter really changed the text


def test_an_adapters_prompt_logprobs_are_the_adapters_own(settings: Settings) -> None:
    """Echo's prompt entries of a request on an adapter come from the adapter's forward
    (not the base's), while a base request's come from the base in the same engine."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = settings.models_dir / TINY_MODEL
    rel = "models/adapter-echo"
    make_adapter(base_dir, settings.data_dir / rel, 3)
    name = f"ft:{TINY_MODEL}:echo:00000003"
    register_adapter(settings, name, rel)
    prompt = "The blue mug keeps coffee warm"
    scored = {"prompts": [prompt], "prompt_logprobs": 0, "max_new_tokens": 0}
    results = run(
        new_engine(settings, str(base_dir)),
        [
            GenerationRequest("adapter", spec(model=name, **scored)),
            GenerationRequest("base", spec(**scored)),
        ],
    )
    ids = AutoTokenizer.from_pretrained(base_dir)(prompt)["input_ids"]
    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), settings.data_dir / rel
    )
    for key, model in (("adapter", tuned), ("base", plain)):
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        result = results[key]
        assert isinstance(result, FinishedRequest), result
        [text] = result.texts
        assert text.data is not None
        got = [e["logprob"] for e in text.data["prompt_logprobs"][1:]]
        expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert got == pytest.approx(expected, abs=1e-4), key
