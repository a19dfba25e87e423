"""P1 by parts: CPU per no-op job of the API's create path and of the worker's lifecycle,
each called in this process (no HTTP, no Celery), so a change to either shows alone.

    python -m bench.job_path_cpu [--jobs 500] [--database-url URL] [--profile] [--json PATH]

The API side validates a `{"kind": "noop"}` request and runs the route's create path
(quota, insert, audit, commit, publish to a private Redis db index); the worker side
runs `JobLifecycle.execute` (claim, heartbeat, run, fenced ending) on queued no-op jobs.
Both report CPU milliseconds per job (process time, which includes the threads they
start); `--profile` prints each side's cProfile, by cumulative time. It sets this
process's settings through the environment, so `make bench` runs it as a process of its
own.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BROKER_DB = 14  # a Redis db index of its own on the local Redis, flushed after the run


def _cpu_ms_per_call(call: Callable[[], None], n: int, profile: bool) -> float:
    # CPU time, not wall time: a round trip's wait for Redis or the database is no cost here
    profiler = cProfile.Profile(time.thread_time) if profile else None
    start = time.process_time()
    if profiler is not None:
        profiler.enable()
    for _ in range(n):
        call()
    if profiler is not None:
        profiler.disable()
    cpu_ms = (time.process_time() - start) * 1000 / n
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    return cpu_ms


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--database-url", default="", help="default: SQLite in a temp dir")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    data = Path(tempfile.mkdtemp(prefix="modelyard-job-path-"))
    url = args.database_url or f"sqlite:///{data / 'bench.db'}"
    broker = f"redis://127.0.0.1:6379/{BROKER_DB}"
    os.environ.update(
        MODELYARD_DATABASE_URL=url,
        MODELYARD_BROKER_URL=broker,
        MODELYARD_DATA_DIR=str(data),
        MODELYARD_MAX_QUEUED_JOBS="100000000",
    )
    # imported after the environment is set: settings are read once
    import redis
    from pydantic import TypeAdapter
    from starlette.responses import Response

    from api.auth import Principal
    from api.routes.jobs import create_job_in
    from core.dispatch import JobPublisher
    from core.settings import get_settings
    from core.specs import JobRequest
    from db.session import migrate, session_scope
    from workers.lifecycle import JobLifecycle

    migrate(url)
    settings = get_settings()
    publisher = JobPublisher(settings)
    who = Principal(
        tenant_id="default", key_id=None, scopes=frozenset({"admin"}), requests_per_minute=1
    )
    requests = TypeAdapter(JobRequest)
    created: list[str] = []

    def create() -> None:
        request = requests.validate_python({"kind": "noop"})
        with session_scope(url) as session:
            job = create_job_in(session, request, Response(), settings, publisher, who, None)
        created.append(job.id)

    lifecycle = JobLifecycle(settings, publisher, "cpu")
    try:
        warm = 50
        for _ in range(warm):
            create()
        api_ms = _cpu_ms_per_call(create, args.jobs, args.profile)
        for job_id in created[:warm]:
            lifecycle.execute(job_id)
        queued = iter(created[warm:])
        worker_ms = _cpu_ms_per_call(
            lambda: lifecycle.execute(next(queued)), args.jobs, args.profile
        )
    finally:
        redis.Redis.from_url(broker).flushdb()
    result = {
        "backend": "postgresql" if url.startswith("postgresql") else "sqlite",
        "jobs": args.jobs,
        "api_create_cpu_ms": api_ms,
        "worker_lifecycle_cpu_ms": worker_ms,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result))
    print(
        f"P1 by parts ({result['backend']}, {args.jobs} no-op jobs, in-process): "
        f"API create path {api_ms:.2f} CPU ms/job, worker lifecycle {worker_ms:.2f} CPU ms/job"
    )
    return result


if __name__ == "__main__":
    main()
