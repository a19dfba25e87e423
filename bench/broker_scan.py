"""P6: what the reconciler's broker scan costs with 10k and 100k queued messages.

The reconciler learns which due queued jobs have a message by reading kombu's queue lists
and unacked hash (core/broker_scan.py) instead of a marker key per job. This times one scan
on a private redis-server holding N messages (real Celery messages of `run_job`, spread
over the priority lists of both queues, plus 100 unacked deliveries), side by side with the
marker check it replaced (a pipeline of EXISTS for the 1000 due jobs a pass looks at).

    python -m bench.broker_scan [--sizes 10000,100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from core.dispatch import JobPublisher, make_celery
from core.enums import JobKind
from core.settings import Settings
from tests.support.broker import receive_and_vanish
from tests.support.services import RedisServer

UNACKED = 100
DUE = 1000


def fill(settings: Settings, client: redis.Redis, n: int) -> None:
    """N queued messages: one published by Celery per queue, cloned with other job ids."""
    publisher = JobPublisher(settings)
    try:
        for kind in (JobKind.GENERATE, JobKind.FINETUNE):
            publisher.publish(uuid.uuid4().hex, kind, 0)
    finally:
        publisher.close()
    templates = []
    for key in ("generate:9", "train:9"):
        raw = client.rpop(key)
        assert isinstance(raw, bytes), key
        templates.append(json.loads(raw))
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        message: dict[str, Any] = dict(templates[i % 2])
        body = json.dumps([[uuid.uuid4().hex], {}, {}]).encode()
        message["body"] = base64.b64encode(body).decode()
        message["properties"] = {**message["properties"], "delivery_tag": uuid.uuid4().hex}
        queue = "generate" if i % 2 == 0 else "train"
        step = i % 10
        pipe.lpush(f"{queue}:{step}" if step else queue, json.dumps(message))
        if len(pipe) >= 5000:
            pipe.execute()
    pipe.execute()
    celery = make_celery(settings)
    for _ in range(UNACKED):
        receive_and_vanish(celery, "generate")


def timed(fn: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="modelyard-scan-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            settings = Settings(data_dir=Path(tmp) / "data", broker_url=server.url)
            client = server.client()
            rows = []
            for n in sizes:
                client.flushdb()
                fill(settings, client, n)
                publisher = JobPublisher(settings)
                found = publisher.messages()
                scan = timed(publisher.messages, args.repeats)
                ids = [uuid.uuid4().hex for _ in range(DUE)]

                def markers(ids: list[str] = ids) -> None:
                    pipe = client.pipeline(transaction=False)
                    for job_id in ids:
                        pipe.exists(f"modelyard:delivery:{job_id}")
                    pipe.execute()

                check = timed(markers, args.repeats)
                publisher.close()
                rows.append((n, found, statistics.median(scan), statistics.median(check)))
        finally:
            server.stop()
    print(
        "| queued messages | found (queued + unacked jobs) | scan p50 | per message | "
        "marker check of 1000 ids p50 | scan / marker check |"
    )
    print("|---|---|---|---|---|---|")
    for n, found, scan_s, check_s in rows:
        print(
            f"| {n:,} | {len(found.queued):,} + {len(found.unacked)} | {scan_s * 1000:.0f} ms | "
            f"{scan_s / (n + UNACKED) * 1e6:.1f} us | {check_s * 1000:.1f} ms | "
            f"{scan_s / check_s:.0f}x |"
        )


if __name__ == "__main__":
    main()
