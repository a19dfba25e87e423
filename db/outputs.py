from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.completions import LOGPROBS
from db.models import Output


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One stored result of a job, a row of `outputs`: a generated text, a prediction
    (`data` holds its label and scores or entities) or an OpenAI batch line (`prompt_index`
    is the line, `data` its output or error line)."""

    prompt_index: int
    sequence_index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    data: dict[str, Any] | None = None  # predictions: label/scores or entities


def storable_text(text: str) -> str:
    """PostgreSQL text cannot hold NUL; a model can emit one. Store U+FFFD instead."""
    return text.replace("\x00", "\ufffd")


TEXT_CHARS = "text_chars"  # in `data` of a text that was not stored: how long it was


def without_text(record: OutputRecord) -> OutputRecord:
    """The record of a text that is not to be stored: its length instead of it (a reader
    that assembled it from the token stream checks it is whole). Its log probability
    entries go too: their tokens' strings are its text."""
    kept = {k: v for k, v in (record.data or {}).items() if k != LOGPROBS}
    return OutputRecord(
        prompt_index=record.prompt_index,
        sequence_index=record.sequence_index,
        text="",
        finish_reason=record.finish_reason,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        data={**kept, TEXT_CHARS: len(storable_text(record.text))},
    )


def add_outputs(session: Session, job_id: str, outputs: Iterable[OutputRecord]) -> None:
    session.add_all(
        Output(
            job_id=job_id,
            prompt_index=o.prompt_index,
            sequence_index=o.sequence_index,
            text=storable_text(o.text),
            finish_reason=o.finish_reason,
            prompt_tokens=o.prompt_tokens,
            completion_tokens=o.completion_tokens,
            data=o.data,
        )
        for o in outputs
    )
    session.flush()


def list_outputs(session: Session, job_id: str) -> Sequence[Output]:
    stmt = (
        select(Output)
        .where(Output.job_id == job_id)
        .order_by(Output.prompt_index, Output.sequence_index)
    )
    return session.scalars(stmt).all()


def count_outputs(session: Session, job_id: str) -> int:
    return session.scalar(select(func.count()).where(Output.job_id == job_id)) or 0
