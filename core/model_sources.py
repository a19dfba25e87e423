"""Where a model may come from: installed under the data dir (or the shared store), the
registry, a local directory, or a Hugging Face hub repository the deployment allowed.
Shared by the API (refusing at submit) and the workers (refusing before any download)."""

from __future__ import annotations

from pathlib import Path

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
    by registry name, within the caller's tenant, never by path."""
    data = settings.data_dir.resolve()
    models = settings.models_dir.resolve()
    for candidate in (Path(ref), settings.models_dir / ref):
        try:
            if not candidate.exists():  # a hub id is not a path, wherever the process runs
                continue
            resolved = candidate.resolve()
        except (OSError, RuntimeError):
            continue
        if resolved.is_relative_to(data) and not resolved.is_relative_to(models):
            return True
    return False
