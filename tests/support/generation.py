"""Shared set-up for the generation engine's tests on the tiny GPT-2: a data dir with the
model installed, and decode-group rows built the way the engine builds them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from core.settings import Settings
from db.registry import register_model
from db.session import migrate, session_scope
from tests.conftest import TINY_MODEL
from tests.support.jobs import insert_job
from workers.generation.cache import CachedModel
from workers.generation.decode_group import Row
from workers.generation.sampling import RowSampling, row_generator
from workers.generation.text import SequenceText


def engine_settings(tiny_model_dir: Path, data: Path) -> Settings:
    """Settings over `data` with the tiny model installed and the database migrated."""
    shutil.copytree(tiny_model_dir, data / "models" / TINY_MODEL)
    settings = Settings(data_dir=data, generation_max_sequences=16)
    migrate(settings.database_url)
    return settings


def register_adapter(settings: Settings, name: str, path: str) -> None:
    """Register the LoRA adapter at `path` (relative to the data dir) on the tiny GPT-2 as
    `name`, as a finished fine-tune would."""
    with session_scope(settings.database_url) as session:
        register_model(
            session,
            name=name,
            base_model=TINY_MODEL,
            task="causal_lm",
            method="lora",
            adapter=True,
            job_id=insert_job(settings.database_url),
            path=path,
            labels=[],
            metrics={},
        )


def tiny_row(
    entry: CachedModel,
    prompt: str,
    max_new_tokens: int = 30,
    top_logprobs: int | None = None,
    **sampling: Any,
) -> Row:
    """One decode-group row: greedy unless `seed` is given (then sampled with it)."""
    seed = sampling.pop("seed", None)
    params: dict[str, Any] = {
        "do_sample": seed is not None,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.0,
        "generator": row_generator(seed) if seed is not None else None,
        **sampling,
    }
    return Row(
        owner=None,
        prompt_index=0,
        sequence_index=0,
        prompt_ids=entry.tokenizer(prompt)["input_ids"],
        sampling=RowSampling(**params),
        max_new_tokens=max_new_tokens,
        text=SequenceText(entry.tokenizer, [], entry.eos_ids, stream=False),
        top_logprobs=top_logprobs,
    )
