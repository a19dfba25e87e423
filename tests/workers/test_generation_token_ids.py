"""Token ids a request names itself, in the decode group and the engine, on the tiny GPT-2:
OpenAI's logit_bias (each row's biases added to its own logits before the choice, never
to its neighbours', and the log probabilities it reports stay the model's own) and
prompts given as token ids (fed as given); an id outside the vocabulary fails that
request alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from core.enums import FailureType
from core.errors import PermanentJobError
from core.settings import Settings
from core.specs import GenerateSpec
from tests.conftest import TINY_MODEL
from tests.support.generation import tiny_row
from workers.generation.cache import CachedModel, ModelCache
from workers.generation.decode_group import DecodeGroup, Row
from workers.generation.engine import base_of, open_engine
from workers.generation.requests import GenerationRequest
from workers.generation.sampling import RowSampling, add_biases, row_bias


@pytest.fixture(scope="module")
def entry(tiny_model_dir: Path) -> CachedModel:
    model, _ = ModelCache(2**30).get(str(tiny_model_dir), "cpu")
    return model


def biased(entry: CachedModel, prompt: str, bias: dict[int, float], **kw: object) -> Row:
    ids, values = row_bias(bias)
    return tiny_row(entry, prompt, bias_ids=ids, bias_values=values, **kw)


def decode_together(entry: CachedModel, rows: list[Row]) -> None:
    group = DecodeGroup(entry.model, "cpu", entry.pad_id, entry.vocab_size)
    with torch.inference_mode():
        group.drop(group.admit(rows))
        while len(group):
            group.drop(group.step())


def test_biases_are_added_to_their_rows_logits_on_a_copy() -> None:
    logits = torch.zeros((2, 5))
    ids, values = row_bias({1: 2.5, 4: -100.0})
    rows = [
        RowSampling(True, 1.0, 1.0, 0, 1.0, None),
        RowSampling(True, 1.0, 1.0, 0, 1.0, None, bias_ids=ids, bias_values=values),
    ]
    out = add_biases(logits, rows)
    assert out[0].tolist() == [0.0] * 5
    assert out[1].tolist() == [0.0, 2.5, 0.0, 0.0, -100.0]
    assert bool((logits == 0).all())  # the model's logits (for logprobs) are left alone
    assert row_bias({}) == (None, None)


def test_a_ban_and_a_forced_token_each_hold_for_their_own_row_alone(entry: CachedModel) -> None:
    plain = tiny_row(entry, "The blue mug")
    alone = tiny_row(entry, "Fresh bread every")
    decode_together(entry, [plain])
    decode_together(entry, [alone])
    chosen = sorted(set(plain.text.ids))
    banned = biased(entry, "The blue mug", {t: -100.0 for t in chosen})
    forced_token = sorted(set(alone.text.ids))[0]
    forced = biased(entry, "Our support team answers", {forced_token: 100.0}, top_logprobs=1)
    neighbour = tiny_row(entry, "Fresh bread every")
    decode_together(entry, [banned, forced, neighbour])

    assert len(banned.text.ids) == 30 and not set(banned.text.ids) & set(chosen)
    assert forced.text.ids == [forced_token] * 30
    assert neighbour.text.ids == alone.text.ids  # the others' biases do not reach it
    # the reported log probability is the model's own, not the biased one (about 0)
    assert all(lp.logprob < -1.0 for lp in forced.text.logprobs)


def test_a_sampled_row_never_draws_a_banned_token(entry: CachedModel) -> None:
    free = tiny_row(entry, "The blue mug", seed=5, temperature=1.5)
    decode_together(entry, [free])
    banned_ids = sorted(set(free.text.ids))
    banned = biased(entry, "The blue mug", {t: -100.0 for t in banned_ids}, seed=5, temperature=1.5)
    decode_together(entry, [banned])
    assert not set(banned.text.ids) & set(banned_ids)


def test_a_token_id_outside_the_vocabulary_fails_the_request_alone(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "models" / TINY_MODEL)
    settings = Settings(data_dir=tmp_path, generation_max_sequences=16)
    engine, _ = open_engine(
        settings, "cpu", base_of(settings, TINY_MODEL)[0], cache=ModelCache(2**30)
    )
    vocab = ModelCache(2**30).get(str(tiny_model_dir), "cpu")[0].vocab_size
    spec = GenerateSpec.model_validate(
        {"model": TINY_MODEL, "prompts": ["Hi"], "logit_bias": {str(vocab): 5}}
    )
    with pytest.raises(PermanentJobError, match=f"token id {vocab} is not in") as info:
        engine.add(GenerationRequest("bad", spec))
    assert info.value.failure is FailureType.INVALID_SPEC
    assert not engine.has_work


def test_prompt_token_ids_decode_as_the_same_text_prompt_and_must_be_in_the_vocabulary(
    tiny_model_dir: Path, tmp_path: Path, entry: CachedModel
) -> None:
    """A prompt given as token ids is fed as given: the ids the text encodes to answer the
    same; an id the model does not have fails that request alone."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / TINY_MODEL)
    settings = Settings(data_dir=tmp_path, generation_max_sequences=16)
    engine, _ = open_engine(
        settings, "cpu", base_of(settings, TINY_MODEL)[0], cache=ModelCache(2**30)
    )
    ids = list(entry.tokenizer("The blue mug")["input_ids"])
    base = {"model": TINY_MODEL, "temperature": 0, "max_new_tokens": 8}
    as_text = GenerateSpec.model_validate({**base, "prompts": ["The blue mug"]})
    as_ids = GenerateSpec.model_validate({**base, "prompt_token_ids": [ids]})
    engine.add(GenerationRequest("text", as_text))
    engine.add(GenerationRequest("ids", as_ids))
    texts: dict[str, list[str]] = {}
    while engine.has_work:
        out = engine.step()
        assert not out.failed
        for f in out.finished:
            texts[f.key] = [t.text for t in f.texts]
    assert texts["ids"] == texts["text"] and texts["text"][0]
    vocab = entry.vocab_size
    outside = GenerateSpec.model_validate({**base, "prompt_token_ids": [ids, [vocab]]})
    with pytest.raises(PermanentJobError, match=f"prompt 1: token id {vocab} is not in") as info:
        engine.add(GenerationRequest("bad", outside))
    assert info.value.failure is FailureType.INVALID_SPEC


def test_prompt_logprobs_are_the_models_own_for_each_prompt_token(
    tiny_model_dir: Path, tmp_path: Path, entry: CachedModel
) -> None:
    """`prompt_logprobs` (OpenAI's echo): each prompt token after the first has log_softmax
    of one plain forward pass at the position before it, with its top alternatives; the
    first has none. Every choice of the prompt carries them."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / TINY_MODEL)
    settings = Settings(data_dir=tmp_path, generation_max_sequences=16)
    engine, _ = open_engine(
        settings, "cpu", base_of(settings, TINY_MODEL)[0], cache=ModelCache(2**30)
    )
    spec = GenerateSpec.model_validate(
        {
            "model": TINY_MODEL,
            "prompts": ["The blue mug keeps coffee warm"],
            "prompt_logprobs": 3,
            "max_new_tokens": 2,
            "num_return_sequences": 2,
            "seed": 1,
        }
    )
    engine.add(GenerationRequest("p", spec))
    texts = []
    while engine.has_work:
        out = engine.step()
        assert not out.failed
        texts += [t for f in out.finished for t in f.texts]
    ids = list(entry.tokenizer("The blue mug keeps coffee warm")["input_ids"])
    with torch.inference_mode():
        logp = torch.log_softmax(entry.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    assert len(texts) == 2
    for text in texts:
        assert text.data is not None
        entries = text.data["prompt_logprobs"]
        assert len(entries) == len(ids) == text.prompt_tokens
        assert entries[0]["logprob"] is None and entries[0]["top_logprobs"] == []
        assert "".join(e["token"] for e in entries) == "The blue mug keeps coffee warm"
        for i, e in enumerate(entries[1:], start=1):
            assert e["logprob"] == pytest.approx(float(logp[i - 1, ids[i]]), abs=1e-4)
            best = torch.topk(logp[i - 1], 3)
            assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx(
                best.values.tolist(), abs=1e-4
            )
        assert "logprobs" not in text.data  # the completion's were not asked for


def test_max_new_tokens_0_answers_the_prompts_entries_alone_at_the_next_step(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A request that only scores its prompts (OpenAI's echo with max_tokens 0) decodes
    nothing: it is finished at the next step, beside a request that decodes."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / TINY_MODEL)
    settings = Settings(data_dir=tmp_path, generation_max_sequences=16)
    engine, _ = open_engine(
        settings, "cpu", base_of(settings, TINY_MODEL)[0], cache=ModelCache(2**30)
    )
    base = {"model": TINY_MODEL, "temperature": 0}
    scored = GenerateSpec.model_validate(
        {
            **base,
            "prompts": ["Fresh bread", "The blue mug"],
            "max_new_tokens": 0,
            "prompt_logprobs": 1,
            "logprobs": True,
        }
    )
    decoded = GenerateSpec.model_validate({**base, "prompts": ["Hi"], "max_new_tokens": 3})
    engine.add(GenerationRequest("decoded", decoded))
    engine.add(GenerationRequest("scored", scored))
    first = engine.step()
    [done] = [f for f in first.finished if f.key == "scored"]
    assert [(t.prompt_index, t.text, t.finish_reason, t.completion_tokens) for t in done.texts] == [
        (0, "", "length", 0),
        (1, "", "length", 0),
    ]
    for t in done.texts:
        assert t.data is not None and t.data["logprobs"] == []
        assert len(t.data["prompt_logprobs"]) == t.prompt_tokens > 1
    assert engine.has_work  # the other request decodes on
    while engine.has_work:
        engine.step()
