"""Generation engines: requests on one base model decoded together, a step at a time.

The caller owns the loop, in the shape of text-generation-inference's
`Model.generate_token(batch)` and vLLM's `LLMEngine.step()`: it adds requests, calls
`step()`, and records what each step gives back (text deltas, finished requests,
requests that failed alone) before the next one. An engine writes nothing to the
database and calls nothing back, so whoever runs it decides what a result means.

`TransformersEngine` is continuous batching on a transformers model: requests join
and leave the decode group between steps; each keeps its own sampling parameters,
seeds and stop strings (see sampling.py and text.py), so its texts do not depend on
what it was decoded with. LoRA adapters from the registry run in the same group as
their base (peft mixed-adapter forwards).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from core import prompts
from core.completions import LOGPROBS, PROMPT_LOGPROBS
from core.enums import FailureType
from core.errors import PermanentJobError
from core.settings import Settings
from core.specs import GenerateSpec
from db.outputs import OutputRecord
from db.registry import is_registry_name
from workers.generation.cache import CachedModel, CacheOutcome, ModelCache
from workers.generation.decode_group import BASE_ADAPTER, DecodeGroup, Row
from workers.generation.grammar import GrammarError, RowMatcher
from workers.generation.logprobs import TokenLogprob, TokenStrings, prompt_logprobs
from workers.generation.requests import (
    FailedRequest,
    FinishedRequest,
    GenerationRequest,
    RequestProgress,
    StepOutput,
    TextDelta,
)
from workers.generation.sampling import RowSampling, row_bias, row_generator
from workers.generation.text import SequenceText
from workers.model_refs import resolve_model

logger = logging.getLogger(__name__)


class GenerationEngine(ABC):
    """Requests on one base model, decoded together one step at a time."""

    @property
    @abstractmethod
    def base(self) -> str:
        """The base model this engine serves (adapters on it included)."""

    @property
    @abstractmethod
    def room(self) -> int:
        """How many more sequences it would start decoding at the next step."""

    @property
    @abstractmethod
    def active(self) -> list[str]:
        """Keys of the requests added and not yet finished, failed or cancelled."""

    @property
    def has_work(self) -> bool:
        return bool(self.active)

    @abstractmethod
    def add(self, request: GenerationRequest) -> None:
        """Take a request; it starts decoding at a next step. Raises (PermanentJobError, an
        adapter that does not load, ...) when this request cannot be served; the engine and
        its other requests are unchanged then."""

    @abstractmethod
    def step(self) -> StepOutput:
        """Decode one token for every running sequence (admitting waiting ones first)."""

    @abstractmethod
    def cancel(self, key: str) -> bool:
        """Forget a request at once; False when the engine did not know it."""

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing to free
        """Free what the engine holds between groups (device memory caches)."""


def row_seed(seed: int, prompt_index: int, sequence_index: int) -> int:
    """One generator seed per sequence, from the request's seed and the sequence's place."""
    return (seed * 1_000_003 + prompt_index * 10_007 + sequence_index) % (2**63)


def base_of(settings: Settings, model: str) -> tuple[str, str | None]:
    """(base model to load, adapter directory or None) for a spec's model."""
    resolved = resolve_model(settings, model)
    if resolved.adapter_of is not None:
        return resolved.adapter_of, resolved.ref
    return resolved.ref, None


def adapter_of(settings: Settings, model: str) -> str | None:
    """The adapter directory a request's model names on its engine's base, None for the base
    itself. Only a registry name can name an adapter; any other model is resolved once, by
    whoever opens the engine on it (resolving again per request was half of `add`)."""
    if not is_registry_name(model):
        return None
    return base_of(settings, model)[1]


def encode_prompts(entry: CachedModel, spec: GenerateSpec) -> list[list[int]]:
    try:
        return prompts.encode_prompts(entry.tokenizer, spec, entry.context_length)
    except prompts.PromptError as exc:
        raise PermanentJobError(exc.message, FailureType.INVALID_SPEC) from exc


# Prompt tokens prefilled per step when the settings leave it unset: on a CPU a prefill
# costs about as much per token as it would take, so a few hundred tokens keep a step short;
# a GPU prefills thousands in the time of a decode step.
CPU_PREFILL_TOKENS = 512
GPU_PREFILL_TOKENS = 8192


@dataclass
class EngineStats:
    steps: int = 0
    admitted: int = 0
    peak_sequences: int = 0
    joined_mid_group: int = 0  # requests added while others were decoding


@dataclass(eq=False)
class _Slot:
    request: GenerationRequest
    rows: list[Row] = field(default_factory=list)
    texts: list[OutputRecord] = field(default_factory=list)
    live: int = 0  # rows admitted or waiting that have not finished
    total_tokens: int = 0
    admitted_at: int = -1  # order in which requests first got a row into the group
    prompt_entries: dict[int, list[dict[str, object]]] = field(default_factory=dict)


class TransformersEngine(GenerationEngine):
    def __init__(
        self,
        settings: Settings,
        device: str,
        cache: ModelCache,
        entry: CachedModel,
        base: str,
    ) -> None:
        self._settings = settings
        self._device = device
        self._cache = cache
        self._entry = entry
        self._base = base
        self.max_sequences = settings.generation_max_sequences
        self.prefill_tokens = settings.generation_prefill_tokens or (
            GPU_PREFILL_TOKENS if device.startswith("cuda") else CPU_PREFILL_TOKENS
        )
        self._group = DecodeGroup(entry.model, device, entry.pad_id, entry.vocab_size)
        self._waiting: deque[Row] = deque()
        self._slots: dict[str, _Slot] = {}
        self._scored: list[_Slot] = []  # requests with no token to generate: done at once
        self._admissions = 0
        self._strings = TokenStrings(entry.tokenizer)
        self.stats = EngineStats()

    @property
    def base(self) -> str:
        return self._base

    @property
    def room(self) -> int:
        return max(0, self.max_sequences - len(self._group) - len(self._waiting))

    @property
    def active(self) -> list[str]:
        return list(self._slots)

    def add(self, request: GenerationRequest) -> None:
        if request.key in self._slots:
            raise ValueError(f"request {request.key} is already in the engine")
        slot = self._prepare(request)
        self._slots[request.key] = slot
        self._waiting.extend(slot.rows)
        if not slot.rows:  # max_new_tokens 0: its prompts were scored in _prepare
            self._scored.append(slot)
        if len(self._group):
            self.stats.joined_mid_group += 1

    def cancel(self, key: str) -> bool:
        slot = self._slots.pop(key, None)
        if slot is None:
            return False
        self._remove_rows(slot)
        return True

    def close(self) -> None:
        if self._device.startswith("cuda"):
            torch.cuda.empty_cache()

    def step(self) -> StepOutput:
        out = StepOutput()
        for slot in self._scored:
            if self._slots.pop(slot.request.key, None) is slot:  # not cancelled meanwhile
                out.finished.append(FinishedRequest(slot.request.key, slot.texts))
        self._scored.clear()
        with torch.inference_mode():
            admitted = self._admit(out)
            touched = self._end_rows(admitted, out)
            if len(self._group):
                try:
                    done = self._group.step()
                except torch.OutOfMemoryError as exc:
                    self._fail_newest(exc, out)
                else:
                    touched |= self._end_rows(done, out)
                    self.stats.steps += 1
        out.progress = [self._progress(s) for s in touched if s.request.key in self._slots]
        return out

    def _prepare(self, req: GenerationRequest) -> _Slot:
        spec = req.spec
        adapter_dir = adapter_of(self._settings, spec.model)
        adapter = BASE_ADAPTER
        if adapter_dir is not None:
            in_use = frozenset(r.adapter for r in self._group.rows)
            adapter = self._cache.adapter(self._entry, adapter_dir, in_use)
            self._group.refresh_model(self._entry.model)
        encoded = encode_prompts(self._entry, spec)
        schema = spec.output_schema
        slot = _Slot(request=req)
        base_seed = spec.seed if spec.seed is not None else int.from_bytes(os.urandom(6), "big")
        outside = prompts.vocabulary_error(spec, self._entry.vocab_size)
        if outside is not None:
            raise PermanentJobError(outside.message, FailureType.INVALID_SPEC)
        bias_ids, bias_values = row_bias(spec.logit_bias)
        for p_index, ids in enumerate(encoded):
            if spec.prompt_logprobs is not None:
                slot.prompt_entries[p_index] = self._prompt_entries(
                    ids, adapter, spec.prompt_logprobs
                )
            if spec.max_new_tokens == 0:  # the prompt scored, nothing generated
                slot.texts += [
                    self._scored_only(spec, slot, p_index, len(ids), s_index)
                    for s_index in range(spec.num_return_sequences)
                ]
                continue
            for s_index in range(spec.num_return_sequences):
                sampling = RowSampling(
                    do_sample=spec.do_sample,
                    temperature=spec.temperature,
                    top_p=spec.top_p,
                    top_k=spec.top_k,
                    repetition_penalty=spec.repetition_penalty,
                    frequency_penalty=spec.frequency_penalty,
                    presence_penalty=spec.presence_penalty,
                    bias_ids=bias_ids,
                    bias_values=bias_values,
                    generator=(
                        row_generator(row_seed(base_seed, p_index, s_index))
                        if spec.do_sample
                        else None
                    ),
                )
                text = SequenceText(
                    self._entry.tokenizer, spec.stop, self._entry.eos_ids, stream=req.stream
                )
                slot.rows.append(
                    Row(
                        owner=slot,
                        prompt_index=p_index,
                        sequence_index=s_index,
                        prompt_ids=ids,
                        sampling=sampling,
                        max_new_tokens=prompts.max_new_tokens(
                            spec, len(ids), self._entry.context_length
                        ),
                        text=text,
                        adapter=adapter,
                        constraint=self._matcher(schema) if schema is not None else None,
                        top_logprobs=spec.top_logprobs if spec.logprobs else None,
                    )
                )
        slot.live = len(slot.rows)
        slot.total_tokens = sum(r.max_new_tokens for r in slot.rows)
        return slot

    @staticmethod
    def _scored_only(
        spec: GenerateSpec, slot: _Slot, p_index: int, prompt_tokens: int, s_index: int
    ) -> OutputRecord:
        """The output of a prompt with no token to generate (max_new_tokens 0): its
        entries only, as OpenAI's echo with max_tokens 0 answers."""
        data: dict[str, object] = {PROMPT_LOGPROBS: slot.prompt_entries[p_index]}
        if spec.logprobs:
            data[LOGPROBS] = []
        return OutputRecord(
            prompt_index=p_index,
            sequence_index=s_index,
            text="",
            finish_reason="length",
            prompt_tokens=prompt_tokens,
            completion_tokens=0,
            data=data,
        )

    def _prompt_entries(self, ids: list[int], adapter: str, top: int) -> list[dict[str, object]]:
        """The prompt's tokens as log probability entries: each one's under the model given
        the tokens before it, with `top` alternatives; the first has none (null)."""
        model = self._entry.model
        extra = {"adapter_names": [adapter]} if hasattr(model, "peft_config") else {}
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=self._device), **extra).logits
        first = self._strings.entry(TokenLogprob(ids[0], 0.0))
        entries: list[dict[str, object]] = [{**first, "logprob": None, "top_logprobs": []}]
        entries += [self._strings.entry(lp) for lp in prompt_logprobs(logits[0], ids, top)]
        return entries

    def _matcher(self, schema: dict[str, object]) -> RowMatcher:
        try:
            return self._entry.grammars().matcher(schema)
        except GrammarError as exc:
            raise PermanentJobError(str(exc), FailureType.INVALID_SPEC) from exc

    def _admit(self, out: StepOutput) -> list[Row]:
        """Prefill waiting rows into the group. Out of memory: the most recently added
        request among them fails, the others wait for the next step."""
        room = self.max_sequences - len(self._group)
        if room <= 0 or not self._waiting:
            return []
        rows = self._next_prefill(room)
        for r in rows:
            if r.owner.admitted_at < 0:
                r.owner.admitted_at = self._admissions
                self._admissions += 1
        try:
            done = self._group.admit(rows)
        except torch.OutOfMemoryError as exc:
            self._waiting.extendleft(reversed(rows))
            newest: _Slot = max((r.owner for r in rows), key=lambda s: s.admitted_at)
            self._fail(newest, exc, out)
            return []
        self.stats.admitted += len(rows)
        self.stats.peak_sequences = max(self.stats.peak_sequences, len(self._group))
        return done

    def _next_prefill(self, room: int) -> list[Row]:
        """Waiting rows, oldest first, up to `room` and the prefill token budget (padded:
        rows x longest prompt); always at least one."""
        rows = [self._waiting.popleft()]
        longest = len(rows[0].prompt_ids)
        while self._waiting and len(rows) < room:
            wider = max(longest, len(self._waiting[0].prompt_ids))
            if (len(rows) + 1) * wider > self.prefill_tokens:
                break
            rows.append(self._waiting.popleft())
            longest = wider
        return rows

    def _fail_newest(self, exc: torch.OutOfMemoryError, out: StepOutput) -> None:
        newest: _Slot = max((r.owner for r in self._group.rows), key=lambda s: s.admitted_at)
        self._fail(newest, exc, out)

    def _fail(self, slot: _Slot, exc: BaseException, out: StepOutput) -> None:
        logger.warning(
            "request %s ran out of memory in a decode group of %d sequences; it fails alone",
            slot.request.key,
            len(self._group),
        )
        self._slots.pop(slot.request.key, None)
        self._remove_rows(slot)
        out.failed.append(FailedRequest(slot.request.key, exc))
        self.close()

    def _remove_rows(self, slot: _Slot) -> None:
        self._group.drop(slot.rows)
        gone = {id(r) for r in slot.rows}
        if any(id(r) in gone for r in self._waiting):
            self._waiting = deque(r for r in self._waiting if id(r) not in gone)

    def _end_rows(self, done: list[Row], out: StepOutput) -> set[_Slot]:
        """Collect the deltas of every row, then drop the rows that ended and finish the
        requests with no row left. Returns the requests that moved."""
        touched: set[_Slot] = set()
        for r in self._group.rows:
            touched.add(r.owner)
            if r.owner.request.stream:
                delta = r.text.delta()
                entries = None
                if r.top_logprobs is not None:
                    entries = [self._strings.entry(lp) for lp in r.text.delta_logprobs()]
                if delta or entries:
                    out.deltas.append(
                        TextDelta(
                            r.owner.request.key, r.prompt_index, r.sequence_index, delta, entries
                        )
                    )
        self._group.drop(done)
        for r in done:
            slot: _Slot = r.owner
            slot.live -= 1
            reason = r.text.finish_reason
            assert reason is not None
            data: dict[str, object] | None = None
            if r.top_logprobs is not None:
                data = {LOGPROBS: [self._strings.entry(lp) for lp in r.text.logprobs]}
            if r.prompt_index in slot.prompt_entries:
                data = {**(data or {}), PROMPT_LOGPROBS: slot.prompt_entries[r.prompt_index]}
            slot.texts.append(
                OutputRecord(
                    prompt_index=r.prompt_index,
                    sequence_index=r.sequence_index,
                    text=r.text.final_text(),
                    finish_reason=reason.value,
                    prompt_tokens=len(r.prompt_ids),
                    completion_tokens=len(r.text.ids),
                    data=data,
                )
            )
            if slot.live == 0:
                self._slots.pop(slot.request.key, None)
                slot.texts.sort(key=lambda t: (t.prompt_index, t.sequence_index))
                out.finished.append(FinishedRequest(slot.request.key, slot.texts))
        return touched

    @staticmethod
    def _progress(slot: _Slot) -> RequestProgress:
        finished = sum(r.max_new_tokens for r in slot.rows if r.text.finished)
        running = sum(r.generated for r in slot.rows if not r.text.finished)
        total = max(slot.total_tokens, 1)
        return RequestProgress(
            key=slot.request.key,
            fraction=min(finished + running, total) / total,
            sequences=len(slot.rows),
            sequences_done=sum(r.text.finished for r in slot.rows),
            completion_tokens=sum(len(r.text.ids) for r in slot.rows),
        )


@lru_cache(maxsize=1)
def _process_cache(budget_bytes: int) -> ModelCache:
    return ModelCache(budget_bytes)


def model_cache(settings: Settings) -> ModelCache:
    """The process's model cache: it lives as long as the process (a worker keeps its
    models between jobs)."""
    return _process_cache(settings.model_cache_mb * 2**20)


def open_engine(
    settings: Settings, device: str, base: str, cache: ModelCache | None = None
) -> tuple[TransformersEngine, CacheOutcome]:
    """An engine for `base` (loaded through the process's model cache unless given one)."""
    cache = cache if cache is not None else model_cache(settings)
    entry, outcome = cache.get(base, device)
    return TransformersEngine(settings, device, cache, entry, base), outcome
