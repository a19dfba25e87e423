"""Shared artifact storage for workers on several hosts (fsspec).

Datasets, registered models and checkpoints are written under the data dir by one
process and read by others. On one host (or with the data dir on a shared mount) that
is enough. With `storage_url` set, the writer publishes each artifact to the shared
store under the same relative path, and a reader on another host fetches it into its
own data dir before use. Publishing happens before the database row that names the
artifact commits, so a row never points at something other hosts cannot fetch.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import fsspec

from core.errors import StorageError
from core.settings import Settings

logger = logging.getLogger(__name__)


class ArtifactStore:
    """Mirror of the data dir's artifacts in an fsspec filesystem; a no-op without a URL."""

    def __init__(self, data_dir: Path, url: str, options: dict[str, Any]) -> None:
        self._root = data_dir.resolve()
        self.enabled = bool(url)
        self._fs: Any = None
        self._base = ""
        if self.enabled:
            self._fs, self._base = fsspec.core.url_to_fs(url, **options)
            self._base = self._base.rstrip("/")

    def _remote(self, local: Path) -> str:
        path = local.resolve()
        if not path.is_relative_to(self._root) or path == self._root:
            raise StorageError(f"{local} is not an artifact under the data dir")
        return f"{self._base}/{path.relative_to(self._root).as_posix()}"

    def publish(self, local: Path) -> None:
        """Copy a file or a directory tree to the shared store (replacing what was there)."""
        if not self.enabled:
            return
        remote = self._remote(local)
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
        for file in files:
            target = remote if file == local else f"{remote}/{file.relative_to(local).as_posix()}"
            self._fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self._fs.put_file(str(file), target)
        logger.info("published %s to shared storage", local.relative_to(self._root))

    def fetch(self, local: Path) -> Path:
        """`local`, copied from the shared store first when this host has no copy. A
        directory is fetched into a temporary sibling and renamed into place, so a reader
        never sees half of it."""
        if not self.enabled or local.exists():
            return local
        remote = self._remote(local)
        if not self._fs.exists(remote):
            return local  # the caller reports the missing artifact as usual
        local.parent.mkdir(parents=True, exist_ok=True)
        staging = local.with_name(f".{local.name}.{uuid.uuid4().hex}.partial")
        try:
            if self._fs.isdir(remote):
                for name in self._fs.find(remote):
                    target = staging / Path(name).relative_to(Path(remote)).as_posix()
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self._fs.get_file(name, str(target))
            else:
                self._fs.get_file(remote, str(staging))
            if not local.exists():
                staging.rename(local)
        finally:
            if staging.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
            elif staging.exists():
                staging.unlink()
        logger.info("fetched %s from shared storage", local.relative_to(self._root))
        return local

    def remove(self, local: Path) -> None:
        """Delete the shared copy (the caller deletes the local one)."""
        if not self.enabled:
            return
        remote = self._remote(local)
        if self._fs.exists(remote):
            self._fs.rm(remote, recursive=True)


@lru_cache(maxsize=8)
def _store(data_dir: Path, url: str, options: tuple[tuple[str, Any], ...]) -> ArtifactStore:
    return ArtifactStore(data_dir, url, dict(options))


def artifact_store(settings: Settings) -> ArtifactStore:
    """The process's store for these settings (one fsspec filesystem per configuration)."""
    options = tuple(sorted(settings.storage_options.items()))
    return _store(settings.data_dir.resolve(), settings.storage_url, options)
