"""Log probabilities from the transformers engine on the tiny GPT-2: the model's own
distribution at each chosen token, only for the requests that ask, one entry per
completion token, streamed with the text that releases them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from core.completions import LOGPROBS
from core.settings import Settings
from core.specs import GenerateSpec
from db.outputs import OutputRecord
from tests.conftest import TINY_MODEL
from tests.support.generation import engine_settings, tiny_row
from workers.generation.cache import CachedModel, ModelCache
from workers.generation.decode_group import DecodeGroup
from workers.generation.engine import TransformersEngine, base_of, open_engine
from workers.generation.requests import FinishedRequest, GenerationRequest, TextDelta


@pytest.fixture(scope="module")
def settings(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return engine_settings(tiny_model_dir, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(2**30)


@pytest.fixture(scope="module")
def entry(settings: Settings, cache: ModelCache) -> CachedModel:
    model, _ = cache.get(base_of(settings, TINY_MODEL)[0], "cpu")
    return model


@pytest.fixture
def engine(settings: Settings, cache: ModelCache) -> TransformersEngine:
    engine, _ = open_engine(settings, "cpu", base_of(settings, TINY_MODEL)[0], cache=cache)
    return engine


def spec(**fields: Any) -> GenerateSpec:
    return GenerateSpec.model_validate({"model": TINY_MODEL, "prompts": ["The blue mug"], **fields})


def run(
    engine: TransformersEngine, requests: dict[str, GenerateSpec], stream: bool = False
) -> tuple[dict[str, list[OutputRecord]], list[TextDelta]]:
    for key, s in requests.items():
        engine.add(GenerationRequest(key, s, stream))
    finished: dict[str, list[OutputRecord]] = {}
    deltas: list[TextDelta] = []
    while engine.has_work:
        out = engine.step()
        assert not out.failed
        deltas += out.deltas
        for f in out.finished:
            assert isinstance(f, FinishedRequest)
            finished[f.key] = f.texts
    return finished, deltas


def entries(record: OutputRecord) -> list[dict[str, Any]]:
    assert record.data is not None
    found: list[dict[str, Any]] = record.data[LOGPROBS]
    return found


def plain_logprobs(entry: CachedModel, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), V]: log_softmax of one forward pass over prompt + generated."""
    ids = torch.tensor([prompt + generated])
    with torch.inference_mode():
        logits = entry.model(input_ids=ids).logits[0].float()
    start = len(prompt) - 1
    return torch.log_softmax(logits[start : start + len(generated)], dim=-1)


def test_values_are_the_models_own_distribution_before_sampling(entry: CachedModel) -> None:
    """A greedy row and a sampled, penalised one decoded together, joined by a third: each
    value is log_softmax of a plain forward pass over its prompt and generated prefix."""
    greedy = tiny_row(entry, "The blue mug", 12, top_logprobs=20)
    sampled = tiny_row(
        entry,
        "Fresh bread every",
        12,
        top_logprobs=20,
        seed=3,
        temperature=1.5,
        top_k=5,
        presence_penalty=1.0,
    )
    late = tiny_row(entry, "Our support team answers", 12, top_logprobs=3, repetition_penalty=1.3)
    group = DecodeGroup(entry.model, "cpu", entry.pad_id, entry.vocab_size)
    with torch.inference_mode():
        group.drop(group.admit([greedy, sampled]))
        group.drop(group.step())
        group.drop(group.admit([late]))
        while len(group):
            group.drop(group.step())
    for row in (greedy, sampled, late):
        got = row.text.logprobs
        assert [lp.token_id for lp in got] == row.text.ids
        assert len(got) == 12
        expected = plain_logprobs(entry, row.prompt_ids, row.text.ids)
        n = row.top_logprobs or 0
        for i, lp in enumerate(got):
            assert lp.logprob == pytest.approx(float(expected[i, lp.token_id]), abs=1e-4)
            best = torch.topk(expected[i], n)
            assert [t for t, _ in lp.top] == best.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=1e-4)
            assert sum(math.exp(v) for _, v in lp.top) <= 1.0 + 1e-6
            if not row.sampling.do_sample and row.sampling.repetition_penalty == 1.0:
                assert lp.top[0] == (lp.token_id, pytest.approx(lp.logprob))


def test_a_greedy_requests_entries_in_openai_shape(engine: TransformersEngine) -> None:
    s = spec(max_new_tokens=10, temperature=0, logprobs=True, top_logprobs=4)
    finished, _ = run(engine, {"g": s})
    [record] = finished["g"]
    got = entries(record)
    assert len(got) == record.completion_tokens == 10
    for e in got:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(e["top_logprobs"]) == 4
        assert e["top_logprobs"][0] == {k: e[k] for k in ("token", "logprob", "bytes")}
        assert e["logprob"] == max(t["logprob"] for t in e["top_logprobs"])


def test_bytes_add_up_to_the_text(engine: TransformersEngine) -> None:
    finished, _ = run(engine, {"b": spec(max_new_tokens=30, temperature=0, logprobs=True)})
    [record] = finished["b"]
    got = entries(record)
    joined = b"".join(bytes(e["bytes"]) for e in got)
    assert (
        joined.decode("utf-8", errors="replace") == record.text
    )  # the random model emits bad UTF-8
    assert any(len(e["bytes"]) != len(e["token"].encode()) for e in got)  # partial characters
    assert all(e["top_logprobs"] == [] for e in got)


def test_rows_that_do_not_ask_are_unchanged_and_get_none(engine: TransformersEngine) -> None:
    plain = spec(max_new_tokens=16, temperature=0.9, seed=5, prompts=["Fresh bread", "Our"])
    asked = plain.model_copy(update={"logprobs": True, "top_logprobs": 2})
    alone, _ = run(engine, {"plain": plain})
    together, _ = run(engine, {"plain": plain, "asked": asked})
    assert [t.text for t in together["plain"]] == [t.text for t in alone["plain"]]
    assert [t.text for t in together["asked"]] == [t.text for t in alone["plain"]]
    assert all(t.data is None for t in together["plain"])
    assert all(len(entries(t)) == t.completion_tokens for t in together["asked"])


def test_stop_strings_keep_one_entry_per_completion_token_and_stream_them(
    engine: TransformersEngine,
) -> None:
    free, _ = run(engine, {"free": spec(temperature=0, max_new_tokens=40)})
    full = free["free"][0].text
    stop = full[20:23]
    s = spec(temperature=0, max_new_tokens=40, stop=[stop], logprobs=True, top_logprobs=1)
    finished, deltas = run(engine, {"s": s}, stream=True)
    [record] = finished["s"]
    assert record.text == full[: full.find(stop)]
    got = entries(record)
    assert len(got) == record.completion_tokens
    streamed: list[dict[str, Any]] = []
    released = ""
    for d in deltas:
        released += d.text
        assert d.logprobs is not None
        streamed += d.logprobs
        # an entry goes out only once all of its token's text did (the stop token's last)
        if d is not deltas[-1]:
            assert released.startswith("".join(e["token"] for e in streamed))
    assert released == record.text
    assert streamed == got
    assert len(deltas) > 1
