"""Files a job made that the API hands out whole: its attempts' TensorBoard event files, as
one gzipped tar (read from this host's data dir, fetched from the shared store first where
another host wrote them)."""

from __future__ import annotations

import io
import tarfile

from core.job_layout import TENSORBOARD_DIR, attempt_dir, job_dir
from core.settings import Settings
from core.storage import artifact_store


def tensorboard_archive(
    settings: Settings, job_id: str, tenant_id: str, attempts: int
) -> bytes | None:
    """Every attempt's event files under `attempt-<n>/` (one TensorBoard run per attempt);
    None when no attempt wrote any."""
    store = artifact_store(settings)
    job = job_dir(settings, job_id, tenant_id)
    buffer = io.BytesIO()
    found = False
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for attempt in range(1, attempts + 1):
            local = attempt_dir(job, attempt) / TENSORBOARD_DIR
            log_dir = store.fetch(local)
            if not log_dir.is_dir():
                continue
            for file in sorted(p for p in log_dir.rglob("*") if p.is_file()):
                name = f"attempt-{attempt}/{file.relative_to(log_dir).as_posix()}"
                archive.add(file, arcname=name, recursive=False)
                found = True
    return buffer.getvalue() if found else None
