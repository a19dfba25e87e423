"""What a model directory may hold: weights in safetensors and built-in architectures only.
Checked by the API when a job names a local model and by workers before they load one."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json")


def files_stamp(paths: Iterable[Path]) -> tuple[int, ...]:
    """The mtime of each of `paths` (-1 for one that is missing): a cache key for what
    was read from them, which changes when any is written, created, removed or replaced
    (a directory's own mtime changes when a file in it is added, removed or renamed)."""
    stamp = []
    for path in paths:
        try:
            stamp.append(path.stat().st_mtime_ns)
        except OSError:
            stamp.append(-1)
    return tuple(stamp)


def custom_code_reason(directory: Path) -> str | None:
    """Why loading `directory` would need code shipped with the model (an `auto_map` in one
    of its configs, or Python files next to the weights); None when it needs none."""
    for name in CODE_CONFIGS:
        path = directory / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"{name} is not readable JSON"
        if isinstance(config, dict) and "auto_map" in config:
            return f"{name} maps classes to custom code (auto_map)"
    scripts = sorted(p.name for p in directory.glob("*.py"))
    if scripts:
        return f"it ships Python code ({', '.join(scripts[:3])})"
    return None
