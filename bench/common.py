"""Shared bench helpers: timing statistics and a private stack."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from core.settings import Settings
from modelyard.servers import create_key
from modelyard.stack import Stack, free_port

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stats:
    values: list[float]

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def fmt(self, unit: str = "", digits: int = 1) -> str:
        return f"{self.median:.{digits}f}{unit} [{self.min:.{digits}f}-{self.max:.{digits}f}]"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # exited meanwhile
        return None
    # the command name (field 2) is in parentheses and may hold spaces
    return text[text.rindex(")") + 2 :].split()


def process_tree_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of `pids` and their live descendants so far, including
    children they have already waited for (Linux /proc)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        stats[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))  # field 4: ppid
    total = 0
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        # fields 14-17: utime, stime, cutime, cstime (the list starts at field 3)
        total += sum(int(v) for v in stats[pid][11:15])
        todo.extend(children.get(pid, []))
    return total / _TICKS_PER_S


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Seconds until `check()` held; TimeoutError after `timeout`."""
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(interval)
    return time.perf_counter() - start


@contextmanager
def private_stack(database_url: str | None = None, **env: str) -> Iterator[tuple[Stack, str]]:
    """A data dir, a private redis-server and an API; yields (stack, api base url)."""
    with tempfile.TemporaryDirectory(prefix="modelyard-bench-") as tmp:
        data = Path(tmp)
        settings = Settings(data_dir=data, database_url=database_url or "")
        stack = Stack(settings, log_dir=data / "logs")
        stack.env.update(
            {
                "MODELYARD_DATA_DIR": str(data),
                "MODELYARD_DATABASE_URL": settings.database_url,
                "MODELYARD_LOG_LEVEL": "WARNING",
                "HF_HUB_OFFLINE": "1",
                # Benchmarks send far more than a tenant's default rate.
                "MODELYARD_REQUESTS_PER_MINUTE": "100000000",
                "MODELYARD_MAX_QUEUED_JOBS": "100000000",
                **{f"MODELYARD_{k.upper()}": v for k, v in env.items()},
            }
        )
        try:
            stack.env["MODELYARD_BROKER_URL"] = stack.start_redis(free_port())
            base = stack.start_api(free_port())
            # Requests carry a real key (auth is part of what is measured); Client reads it.
            os.environ["MODELYARD_API_KEY"] = create_key(settings, "bench", ["admin"])
            yield stack, base
        finally:
            stack.stop()
            keep = os.environ.get("BENCH_KEEP_LOGS")  # a folder for the run's process logs
            if keep:
                shutil.copytree(data / "logs", keep, dirs_exist_ok=True)


def auth_headers() -> dict[str, str]:
    """The Bearer header of the key `private_stack` created."""
    return {"Authorization": f"Bearer {os.environ['MODELYARD_API_KEY']}"}
