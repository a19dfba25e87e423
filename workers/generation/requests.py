"""What the generation engine takes and gives back, one entry per job (or batch line)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from core.specs import GenerateSpec
from db.outputs import GeneratedText

# (prompt_index, sequence_index, text added since the last delta)
DeltaSink = Callable[[int, int, str], None]


@dataclass
class GenerationRequest:
    """One job's prompts. `key` names it in results (a job id or a batch line's custom_id)."""

    key: str
    spec: GenerateSpec
    stop_event: threading.Event = field(default_factory=threading.Event)
    on_delta: DeltaSink | None = None
    on_progress: Callable[[float, dict[str, int]], None] | None = None  # fraction, token counts


@dataclass
class RequestResult:
    key: str
    texts: list[GeneratedText]
    stopped: bool = False  # stop_event was set before every sequence ended
    error: str | None = None  # why this request failed alone (the others went on)
    error_type: str | None = None
