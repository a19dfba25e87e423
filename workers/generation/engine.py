"""The generation engine: requests for one base model decoded together, joining and
leaving the batch between decoding steps (continuous batching).

Each request keeps its own sampling parameters, seeds and stop strings (see
sampling.py and text.py), so its texts do not depend on what it was batched
with. A request whose stop event is set leaves the batch at the next step; the
others go on. LoRA adapters from the registry run in the same batch as their
base (peft mixed-adapter batches).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from core import prompts
from core.enums import FailureType
from core.errors import JobError, PermanentJobError
from core.settings import Settings
from core.specs import GenerateSpec
from db.outputs import GeneratedText
from workers.generation.batch import BASE_ADAPTER, DecodeBatch, Row
from workers.generation.cache import CachedModel, CacheOutcome, ModelCache
from workers.generation.requests import GenerationRequest, RequestResult
from workers.generation.sampling import RowSampling, row_generator
from workers.generation.text import SequenceText
from workers.model_refs import resolve_model

logger = logging.getLogger(__name__)

FinishedSink = Callable[[RequestResult], None]
# Called between steps with room for this many more sequences; returns requests to add.
MoreRequests = Callable[[int], list[GenerationRequest]]


def row_seed(seed: int, prompt_index: int, sequence_index: int) -> int:
    """One generator seed per sequence, from the request's seed and the sequence's place."""
    return (seed * 1_000_003 + prompt_index * 10_007 + sequence_index) % (2**63)


@dataclass
class _Slot:
    request: GenerationRequest
    rows: list[Row] = field(default_factory=list)
    texts: list[GeneratedText] = field(default_factory=list)
    live: int = 0  # rows admitted or waiting that have not finished
    total_tokens: int = 0


@dataclass
class EngineStats:
    steps: int = 0
    admitted: int = 0
    peak_rows: int = 0
    joined_mid_batch: int = 0  # requests that joined while others were decoding


def encode_prompts(entry: CachedModel, spec: GenerateSpec) -> list[list[int]]:
    try:
        return prompts.encode_prompts(entry.tokenizer, spec, entry.context_length)
    except prompts.PromptError as exc:
        raise PermanentJobError(exc.message, FailureType.INVALID_SPEC) from exc


class GenerationEngine:
    def __init__(self, settings: Settings, device: str, cache: ModelCache) -> None:
        self._settings = settings
        self._device = device
        self.cache = cache
        self.max_rows = settings.generation_max_batch
        self.stats = EngineStats()

    def base_of(self, model: str) -> tuple[str, str | None]:
        """(base model to load, adapter directory or None) for a spec's model."""
        resolved = resolve_model(self._settings, model)
        if resolved.adapter_of is not None:
            return resolved.adapter_of, resolved.ref
        return resolved.ref, None

    def load(self, base: str) -> tuple[CachedModel, CacheOutcome]:
        return self.cache.get(base, self._device)

    def run(
        self,
        entry: CachedModel,
        requests: Sequence[GenerationRequest],
        on_finished: FinishedSink,
        *,
        more: MoreRequests | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        """Decode `requests` (and whatever `more` adds) on a loaded base until none is left."""
        batch = DecodeBatch(entry.model, self._device, entry.pad_id, entry.vocab_size)
        waiting: deque[Row] = deque()
        slots: list[_Slot] = []

        def add(reqs: Sequence[GenerationRequest]) -> None:
            for req in reqs:
                slot = self._prepare(entry, req, batch, on_finished)
                if slot is not None:
                    slots.append(slot)
                    waiting.extend(slot.rows)
                    if len(batch):
                        self.stats.joined_mid_batch += 1

        add(requests)
        last_poll = 0.0
        with torch.inference_mode():
            while True:
                self._drop_stopped(batch, waiting, slots, on_finished)
                room = self.max_rows - len(batch)
                if more is not None and room > len(waiting):
                    now = time.monotonic()
                    if not batch.rows or now - last_poll >= self._settings.generation_poll_s:
                        last_poll = now
                        add(more(room - len(waiting)))
                if not waiting and not batch.rows:
                    break
                try:
                    self._end_rows(batch, self._admit(batch, waiting), slots, on_finished)
                    self.stats.peak_rows = max(self.stats.peak_rows, len(batch))
                    self._end_rows(batch, batch.step(), slots, on_finished)
                except torch.OutOfMemoryError as exc:
                    self._fail_all(batch, waiting, slots, on_finished, exc)
                    continue
                self.stats.steps += 1
                if after_step is not None:
                    after_step()
        torch_empty_cache(self._device)

    def _prepare(
        self,
        entry: CachedModel,
        req: GenerationRequest,
        batch: DecodeBatch,
        on_finished: FinishedSink,
    ) -> _Slot | None:
        spec = req.spec
        try:
            _, adapter_dir = self.base_of(spec.model)
            adapter = BASE_ADAPTER
            if adapter_dir is not None:
                in_use = frozenset(r.adapter for r in batch.rows)
                adapter = self.cache.adapter(entry, adapter_dir, in_use)
                batch.refresh_model(entry.model)
            prompts = encode_prompts(entry, spec)
        except JobError as exc:
            failure = (
                exc.failure if isinstance(exc, PermanentJobError) else FailureType.RUNTIME_ERROR
            )
            on_finished(RequestResult(req.key, [], error=str(exc), error_type=failure.value))
            return None
        slot = _Slot(request=req)
        base_seed = spec.seed if spec.seed is not None else int.from_bytes(os.urandom(6), "big")
        stream = req.on_delta is not None
        for p_index, ids in enumerate(prompts):
            for s_index in range(spec.num_return_sequences):
                sampling = RowSampling(
                    do_sample=spec.do_sample,
                    temperature=spec.temperature,
                    top_p=spec.top_p,
                    top_k=spec.top_k,
                    repetition_penalty=spec.repetition_penalty,
                    generator=(
                        row_generator(row_seed(base_seed, p_index, s_index))
                        if spec.do_sample
                        else None
                    ),
                )
                slot.rows.append(
                    Row(
                        owner=slot,
                        prompt_index=p_index,
                        sequence_index=s_index,
                        prompt_ids=ids,
                        sampling=sampling,
                        max_new_tokens=spec.max_new_tokens,
                        text=SequenceText(entry.tokenizer, spec.stop, entry.eos_ids, stream=stream),
                        adapter=adapter,
                    )
                )
        slot.live = len(slot.rows)
        slot.total_tokens = len(slot.rows) * spec.max_new_tokens
        return slot

    def _admit(self, batch: DecodeBatch, waiting: deque[Row]) -> list[Row]:
        room = self.max_rows - len(batch)
        if room <= 0 or not waiting:
            return []
        group = [waiting.popleft() for _ in range(min(room, len(waiting)))]
        self.stats.admitted += len(group)
        return batch.admit(group)

    def _end_rows(
        self, batch: DecodeBatch, done: list[Row], slots: list[_Slot], on_finished: FinishedSink
    ) -> None:
        self._emit(batch.rows)
        self._finish_rows(batch, done, slots, on_finished)

    @staticmethod
    def _emit(rows: list[Row]) -> None:
        for r in rows:
            sink = r.owner.request.on_delta
            if sink is None:
                continue
            delta = r.text.delta()
            if delta:
                sink(r.prompt_index, r.sequence_index, delta)

    def _finish_rows(
        self, batch: DecodeBatch, done: list[Row], slots: list[_Slot], on_finished: FinishedSink
    ) -> None:
        batch.drop(done)
        for r in done:
            slot: _Slot = r.owner
            slot.live -= 1
            reason = r.text.finish_reason
            assert reason is not None
            slot.texts.append(
                GeneratedText(
                    prompt_index=r.prompt_index,
                    sequence_index=r.sequence_index,
                    text=r.text.final_text(),
                    finish_reason=reason.value,
                    prompt_tokens=len(r.prompt_ids),
                    completion_tokens=len(r.text.ids),
                )
            )
        for slot in {id(r.owner): r.owner for r in [*batch.rows, *done]}.values():
            self._report_progress(slot)
        for slot in [s for s in slots if s.live == 0]:
            slots.remove(slot)
            slot.texts.sort(key=lambda t: (t.prompt_index, t.sequence_index))
            on_finished(RequestResult(slot.request.key, slot.texts))

    @staticmethod
    def _report_progress(slot: _Slot) -> None:
        sink = slot.request.on_progress
        if sink is None or slot.total_tokens == 0:
            return
        finished = sum(r.max_new_tokens for r in slot.rows if r.text.finished)
        running = sum(r.generated for r in slot.rows if not r.text.finished)
        done = min(finished + running, slot.total_tokens)
        completion = sum(len(r.text.ids) for r in slot.rows)
        sink(
            done / slot.total_tokens,
            {
                "sequences": len(slot.rows),
                "sequences_done": sum(r.text.finished for r in slot.rows),
                "completion_tokens": completion,
            },
        )

    def _drop_stopped(
        self,
        batch: DecodeBatch,
        waiting: deque[Row],
        slots: list[_Slot],
        on_finished: FinishedSink,
    ) -> None:
        for slot in [s for s in slots if s.request.stop_event.is_set()]:
            slots.remove(slot)
            batch.drop(slot.rows)
            for r in slot.rows:
                if r in waiting:
                    waiting.remove(r)
            on_finished(RequestResult(slot.request.key, [], stopped=True))

    def _fail_all(
        self,
        batch: DecodeBatch,
        waiting: deque[Row],
        slots: list[_Slot],
        on_finished: FinishedSink,
        exc: BaseException,
    ) -> None:
        logger.warning("generation batch of %d sequences ran out of memory", len(batch))
        batch.drop(list(batch.rows))
        waiting.clear()
        for slot in list(slots):
            slots.remove(slot)
            on_finished(
                RequestResult(
                    slot.request.key,
                    [],
                    error=f"out of memory: {exc}",
                    error_type=FailureType.OUT_OF_MEMORY.value,
                )
            )
        torch_empty_cache(self._device)


def torch_empty_cache(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


_ENGINES: dict[tuple[str, str, str], GenerationEngine] = {}
_ENGINES_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _process_cache(budget_bytes: int) -> ModelCache:
    return ModelCache(budget_bytes)


def engine_for(settings: Settings, device: str) -> GenerationEngine:
    """The process's engine for these settings and device. Engines share one model cache,
    which lives as long as the process (a worker keeps its models between jobs)."""
    key = (device, settings.database_url, str(settings.data_dir.resolve()))
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            cache = _process_cache(settings.model_cache_mb * 2**20)
            engine = _ENGINES[key] = GenerationEngine(settings, device, cache)
        return engine


def run_requests(
    settings: Settings,
    device: str,
    requests: Sequence[GenerationRequest],
    on_finished: FinishedSink,
) -> None:
    """Run every request (any models); `on_finished` gets each result as soon as it is ready."""
    engine = engine_for(settings, device)
    groups: dict[str, list[GenerationRequest]] = {}
    for req in requests:
        try:
            base, _ = engine.base_of(req.spec.model)
        except PermanentJobError as exc:
            on_finished(RequestResult(req.key, [], error=str(exc), error_type=exc.failure.value))
            continue
        groups.setdefault(base, []).append(req)
    for base, group in groups.items():
        try:
            entry, _ = engine.load(base)
            engine.run(entry, group, on_finished)
        except PermanentJobError as exc:
            for req in group:
                on_finished(
                    RequestResult(req.key, [], error=str(exc), error_type=exc.failure.value)
                )
