"""Runs a GenerateSpec with transformers' `generate`, one prompt at a time.

Each prompt is seeded with `seed + prompt_index`, so a prompt's texts do not
depend on the other prompts in the job.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, set_seed

from core.enums import FailureType, FinishReason
from core.errors import PermanentJobError
from core.settings import Settings
from core.specs import GenerateSpec
from db.outputs import GeneratedText
from workers.context import RunContext
from workers.generation.models import LoadedModel, load_causal_lm
from workers.model_refs import resolve_model
from workers.runners import RunResult

logger = logging.getLogger(__name__)


class StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once the job must stop."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> Any:
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the earliest stop sequence, and whether one was found."""
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


class GenerationRunner:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def run(self, raw_spec: dict[str, Any], ctx: RunContext) -> RunResult:
        spec = GenerateSpec.model_validate(raw_spec)
        resolved = resolve_model(self._settings, spec.model)
        loaded = load_causal_lm(resolved.ref, ctx.device, resolved.adapter_of)
        results: list[GeneratedText] = []
        for index, prompt in enumerate(spec.prompts or []):
            ctx.check_stop()
            try:
                results.extend(self._one_prompt(loaded, spec, index, prompt, ctx))
            except torch.OutOfMemoryError as exc:
                raise PermanentJobError(str(exc), FailureType.OUT_OF_MEMORY) from exc
            ctx.report_progress((index + 1) / spec.prompt_count)
        return RunResult(outputs=results)

    def _encode(self, loaded: LoadedModel, spec: GenerateSpec, prompt: str) -> Any:
        tok = loaded.tokenizer
        if spec.chat:
            if not getattr(tok, "chat_template", None):
                raise PermanentJobError(
                    f"model {spec.model!r} has no chat template; send chat=false",
                    FailureType.INVALID_SPEC,
                )
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return tok(text, return_tensors="pt", add_special_tokens=False)
        return tok(prompt, return_tensors="pt")

    def _one_prompt(
        self, loaded: LoadedModel, spec: GenerateSpec, index: int, prompt: str, ctx: RunContext
    ) -> list[GeneratedText]:
        tok, model = loaded.tokenizer, loaded.model
        enc = self._encode(loaded, spec, prompt).to(loaded.device)
        prompt_len = int(enc["input_ids"].shape[1])
        if spec.seed is not None:
            set_seed(spec.seed + index)
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
        kwargs: dict[str, Any] = {
            "max_new_tokens": spec.max_new_tokens,
            "num_return_sequences": spec.num_return_sequences,
            "repetition_penalty": spec.repetition_penalty,
            "pad_token_id": pad,
            "stopping_criteria": StoppingCriteriaList([StopOnEvent(ctx.stop_event)]),
        }
        if spec.do_sample:
            kwargs.update(
                do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k
            )
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if spec.stop:
            kwargs.update(stop_strings=spec.stop, tokenizer=tok)
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        ctx.check_stop()
        texts: list[GeneratedText] = []
        for seq_index in range(out.shape[0]):
            new_ids = out[seq_index, prompt_len:].tolist()
            finished = False
            if eos is not None and eos in new_ids:
                new_ids = new_ids[: new_ids.index(eos)]
                finished = True
            elif tok.pad_token_id is not None:
                while new_ids and new_ids[-1] == tok.pad_token_id:
                    new_ids.pop()
            text = tok.decode(new_ids, skip_special_tokens=True)
            text, stopped = cut_at_stop(text, spec.stop)
            reason = FinishReason.STOP if (finished or stopped) else FinishReason.LENGTH
            texts.append(
                GeneratedText(
                    prompt_index=index,
                    sequence_index=seq_index,
                    text=text,
                    finish_reason=reason.value,
                    prompt_tokens=prompt_len,
                    completion_tokens=len(new_ids),
                )
            )
        return texts
