"""Job specs: one definition, used by the API to validate and by workers to run."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from core.enums import JobKind

MODEL_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,254}$"
_BLANK = re.compile(r"^\s*$")

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=32_000)]
StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MetadataKey = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
]
MetadataValue = Annotated[str, StringConstraints(max_length=512)] | int | float | bool | None


class GenerateSpec(BaseModel):
    """Prompts to complete with a causal language model."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        pattern=MODEL_REF_PATTERN,
        description="A model directory name under the data dir's models/, a path, or a hub id.",
    )
    prompts: list[Prompt] = Field(min_length=1, max_length=256)
    chat: bool = Field(
        default=False, description="Wrap each prompt as a user message with the chat template."
    )
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000, description="0 disables top-k filtering.")
    repetition_penalty: float = Field(default=1.0, ge=0.5, le=2.0)
    num_return_sequences: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: list[StopSequence] = Field(default_factory=list, max_length=8)

    @field_validator("model")
    @classmethod
    def _no_parent_segments(cls, model: str) -> str:
        if ".." in model.split("/"):
            raise ValueError("model may not contain '..' segments")
        return model

    @field_validator("prompts")
    @classmethod
    def _no_blank_prompts(cls, prompts: list[str]) -> list[str]:
        for i, p in enumerate(prompts):
            if _BLANK.match(p):
                raise ValueError(f"prompt {i} is blank")
        return prompts

    @model_validator(mode="after")
    def _sampling_consistent(self) -> GenerateSpec:
        if self.temperature == 0 and self.num_return_sequences > 1:
            raise ValueError("num_return_sequences > 1 needs temperature > 0 (greedy is unique)")
        return self

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


class NoopSpec(BaseModel):
    """A job that only waits: probes the pipeline end to end and measures its overhead."""

    model_config = ConfigDict(extra="forbid")

    duration_s: float = Field(default=0.0, ge=0.0, le=3600.0)


class _JobRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: int = Field(default=0, ge=0, le=9, description="0 (lowest) to 9 (highest).")
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=32)


class GenerateJobRequest(_JobRequestBase):
    """Body of `POST /v1/jobs` for a generation job."""

    kind: Literal[JobKind.GENERATE]
    spec: GenerateSpec


class NoopJobRequest(_JobRequestBase):
    """Body of `POST /v1/jobs` for a no-op job."""

    kind: Literal[JobKind.NOOP]
    spec: NoopSpec = Field(default_factory=NoopSpec)


JobRequest = Annotated[GenerateJobRequest | NoopJobRequest, Field(discriminator="kind")]

SPEC_FOR_KIND: dict[JobKind, type[BaseModel]] = {
    JobKind.GENERATE: GenerateSpec,
    JobKind.NOOP: NoopSpec,
}


def parse_spec(kind: JobKind, spec: dict[str, Any]) -> BaseModel:
    """Rebuild a stored spec for a worker."""
    return SPEC_FOR_KIND[kind].model_validate(spec)
