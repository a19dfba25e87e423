from __future__ import annotations

import torch


def resolve_device(setting: str) -> str:
    """`auto` picks CUDA when present (one worker process per GPU), else CPU."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting
