"""The base models installed under the data dir's models/, read from their files.

A directory counts as an installed model when it holds safetensors weights and a
config.json (what the workers load, with `trust_remote_code` off); a hub-style name
(`org/name`) is a directory one level down. Only the files are read (config.json,
tokenizer_config.json, chat_template.jinja), so the API never imports transformers.
With shared storage, a model only in the store is not listed until this host has it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstalledModel:
    name: str
    architectures: list[str]
    chat_template: bool


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _has_chat_template(directory: Path) -> bool:
    """chat_template.jinja, or a template (or named templates) in tokenizer_config.json."""
    if (directory / "chat_template.jinja").is_file():
        return True
    config = _json_object(directory / "tokenizer_config.json") or {}
    template = config.get("chat_template")
    return bool(template) and isinstance(template, str | list)


def _model_at(directory: Path, name: str) -> InstalledModel | None:
    if not (directory / "config.json").is_file() or not any(directory.glob("*.safetensors")):
        return None
    config = _json_object(directory / "config.json")
    if config is None:
        logger.warning("model directory %s has an unreadable config.json; not listed", directory)
        return None
    architectures = config.get("architectures")
    return InstalledModel(
        name=name,
        architectures=[str(a) for a in architectures] if isinstance(architectures, list) else [],
        chat_template=_has_chat_template(directory),
    )


def _subdirectories(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def installed_models(models_dir: Path) -> list[InstalledModel]:
    """The models under `models_dir`, sorted by name."""
    found: list[InstalledModel] = []
    for directory in _subdirectories(models_dir):
        model = _model_at(directory, directory.name)
        if model is not None:
            found.append(model)
            continue
        for nested in _subdirectories(directory):
            model = _model_at(nested, f"{directory.name}/{nested.name}")
            if model is not None:
                found.append(model)
    return sorted(found, key=lambda m: m.name)
