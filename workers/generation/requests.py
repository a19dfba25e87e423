"""What a generation engine takes (a request) and what one step of it gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.specs import GenerateSpec
from db.outputs import OutputRecord


@dataclass(frozen=True)
class GenerationRequest:
    """One job's prompts. `key` names it in step outputs (a job id or a batch line's
    custom_id); `stream` asks for text deltas as the sequences grow."""

    key: str
    spec: GenerateSpec
    stream: bool = False


@dataclass(frozen=True, slots=True)
class TextDelta:
    key: str
    prompt_index: int
    sequence_index: int
    text: str  # text added to this sequence since its previous delta
    # the entries (logprobs.TokenStrings.entry) of the tokens whose text is now all given
    # out; None when the request did not ask for log probabilities
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    key: str
    texts: list[OutputRecord]  # every sequence, in (prompt_index, sequence_index) order


@dataclass(frozen=True, slots=True)
class FailedRequest:
    """A request that failed alone (out of memory while it was decoded, ...); the others go on."""

    key: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class RequestProgress:
    key: str
    fraction: float
    sequences: int
    sequences_done: int
    completion_tokens: int

    def detail(self) -> dict[str, int]:
        return {
            "sequences": self.sequences,
            "sequences_done": self.sequences_done,
            "completion_tokens": self.completion_tokens,
        }


@dataclass
class StepOutput:
    """What one step produced. A request appears in `finished` or `failed` once, at its end;
    after that the engine no longer knows it."""

    deltas: list[TextDelta] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)
    failed: list[FailedRequest] = field(default_factory=list)
    progress: list[RequestProgress] = field(default_factory=list)
