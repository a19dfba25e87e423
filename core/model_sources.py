"""Where a model may come from: installed under the data dir (or the shared store), the
registry, a local directory, or a Hugging Face hub repository the deployment allowed.
Shared by the API (refusing at submit) and the workers (refusing before any download)."""

from __future__ import annotations

import os
from functools import lru_cache

from core.settings import Settings


def hub_allowed(settings: Settings, ref: str) -> bool:
    """Whether `ref` may be downloaded from the hub: downloads on and the repository (or
    its whole organisation, `org/*`, or `*`: any) allow-listed."""
    if not settings.hub_downloads:
        return False
    for entry in settings.hub_allowed_models:
        if entry in ("*", ref) or (entry.endswith("/*") and ref.startswith(entry[:-1])):
            return True
    return False


def not_installed(settings: Settings, ref: str) -> str:
    """Why `ref` cannot be loaded, naming it and what would make it loadable."""
    where = settings.models_dir / ref
    if not settings.hub_downloads:
        hub = "hub downloads are off (MODELYARD_HUB_DOWNLOADS)"
    else:
        hub = "it is not in MODELYARD_HUB_ALLOWED_MODELS"
    return f"model {ref!r} is not installed (no directory {where}) and {hub}"


def into_tenant_files(settings: Settings, ref: str) -> bool:
    """Whether `ref`, read as a path (as it is, or under models/), leads into the data dir
    outside models/: tenants' datasets, job files and registered models. Those are reached
    by registry name, within the caller's tenant, never by path. Every submitted job that
    names a model asks this, so it works on strings (os.path) and resolves the two roots
    once per process."""
    data = _real_root(str(settings.data_dir))
    models = _real_root(str(settings.models_dir))
    for candidate in (ref, os.path.join(settings.models_dir, ref)):
        if not os.path.exists(candidate):  # a hub id is not a path, wherever the process runs
            continue
        resolved = os.path.realpath(candidate)
        if _within(resolved, data) and not _within(resolved, models):
            return True
    return False


@lru_cache(maxsize=16)
def _real_root(directory: str) -> str:
    return os.path.realpath(directory)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
