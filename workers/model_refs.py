"""Turning a model reference from a spec into something from_pretrained can load.

A registry name (`ft:...`) becomes its artifact directory (and, for a LoRA
adapter, the base it applies to); a name under the data dir's models/ becomes
that directory; anything else is passed on as a path or hub id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.enums import FailureType
from core.errors import PermanentJobError
from core.model_files import custom_code_reason
from core.model_sources import hub_allowed, into_tenant_files, not_installed
from core.settings import Settings
from core.storage import ArtifactStore, artifact_store
from db.registry import get_model, is_registry_name
from db.session import session_scope


@dataclass(frozen=True)
class ResolvedModel:
    """A base model ready for from_pretrained: a local directory or a hub id."""

    ref: str
    labels: list[str] = field(default_factory=list)  # set for registered classifiers/taggers
    adapter_of: str | None = None  # for a registered LoRA adapter: the base model ref


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing anything that resolves outside `root`."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise PermanentJobError(f"path {relative!r} escapes the data dir", FailureType.INVALID_SPEC)
    return path


def resolve_local(
    ref: str,
    models_dir: Path,
    store: ArtifactStore | None = None,
    settings: Settings | None = None,
) -> str:
    """A model directory under models_dir (fetched from shared storage when this host has
    no copy), another local directory, or else a hub id; with `settings`, only a hub id
    they allow (core/model_sources.py): anything else fails at once (`model_not_found`,
    naming it), before any download is tried."""
    local = models_dir / ref
    if store is not None and local.resolve().is_relative_to(models_dir.resolve()):
        store.fetch(local)
    if local.is_dir() and local.resolve().is_relative_to(models_dir.resolve()):
        refuse_custom_code(local)
        return str(local)
    if settings is not None and into_tenant_files(settings, ref):
        raise PermanentJobError(
            f"model {ref!r} is a path into the data dir (registered models are used by name)",
            FailureType.MODEL_NOT_FOUND,
        )
    if Path(ref).is_dir():
        refuse_custom_code(Path(ref))
        return ref
    if settings is not None and not hub_allowed(settings, ref):
        raise PermanentJobError(not_installed(settings, ref), FailureType.MODEL_NOT_FOUND)
    return ref


def refuse_custom_code(directory: Path) -> None:
    """trust_remote_code stays off; a model that needs its own code is refused outright
    rather than loaded with whatever built-in class its model_type happens to name."""
    reason = custom_code_reason(directory)
    if reason is not None:
        raise PermanentJobError(
            f"model directory {directory.name} is refused: {reason}", FailureType.INVALID_SPEC
        )


def resolve_model(settings: Settings, ref: str, tenant_id: str | None = None) -> ResolvedModel:
    """`tenant_id`: the job's tenant, whose registered models alone it may use (None: any,
    for a model already checked, e.g. one a batch of several tenants' jobs shares)."""
    if not is_registry_name(ref):
        local = resolve_local(ref, settings.models_dir, artifact_store(settings), settings)
        return ResolvedModel(ref=local)
    with session_scope(settings.database_url, readonly=True) as session:
        model = get_model(session, ref, tenant_id)
        if model is None:
            raise PermanentJobError(f"no registered model {ref!r}", FailureType.MODEL_NOT_FOUND)
        path, base, adapter, labels = model.path, model.base_model, model.adapter, model.labels
    directory = artifact_store(settings).fetch(inside(settings.data_dir, path))
    if not directory.is_dir():
        raise PermanentJobError(
            f"registered model {ref!r} has no files at {path}", FailureType.MODEL_NOT_FOUND
        )
    refuse_custom_code(directory)
    adapter_of = resolve_model(settings, base, tenant_id).ref if adapter else None
    return ResolvedModel(ref=str(directory), labels=list(labels), adapter_of=adapter_of)
