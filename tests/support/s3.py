"""A throwaway S3-compatible server (moto in server mode) for tests of shared storage.

moto runs as its own process (`moto_server`), not as `moto.server.ThreadedMotoServer`
inside the test process. Measured on the 2-core test machine: the subprocess answers
its first request about 0.31 s after Popen; the threaded server answers after 0.02 s but
costs 0.24 s to import into the test process and 0.5 s to stop, so neither is faster over
a module. The subprocess is chosen because it keeps moto's Flask/boto stack out of the
test process (no GIL shared with the test, no warnings of moto's turned into errors by
pytest's filter) and is reached over HTTP like the store of another host.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.services import free_port, in_netns, missing_service

logger = logging.getLogger(__name__)

BUCKET = "modelyard-test"


@dataclass(frozen=True)
class S3Store:
    """Where the store is, in the shape of `Settings.storage_url` and `storage_options`."""

    url: str  # s3://bucket/prefix
    options: dict[str, str]  # endpoint_url, key, secret

    def env(self) -> dict[str, str]:
        """The MODELYARD_* variables that point a process at this store."""
        return {
            "MODELYARD_STORAGE_URL": self.url,
            "MODELYARD_STORAGE_OPTIONS": json.dumps(self.options),
        }

    def filesystem(self) -> Any:
        """An s3fs filesystem on the server (a fresh instance, no listing cache)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.options)

    def key(self, relative: str) -> str:
        """The object key of `relative` (a path under the data dir) in the store."""
        return f"{self.url.removeprefix('s3://')}/{relative}"


class MotoServer:
    """`moto_server` on a free loopback port; `stop()` ends it. `host` and `netns` put it on
    another address inside a network namespace (tests/support/netns.py), as
    services.RedisServer does."""

    def __init__(self, host: str = "127.0.0.1", netns: str | None = None) -> None:
        binary = Path(sys.executable).with_name("moto_server")
        if not binary.exists():
            found = shutil.which("moto_server")
            if found is None:
                missing_service("moto_server (pip install 'moto[server]')")
            binary = Path(str(found))
        self.binary = binary
        self.host = host
        self.netns = netns
        self.port = free_port()
        self.endpoint_url = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> None:
        self.proc = subprocess.Popen(
            in_netns(self.netns, [str(self.binary), "-H", self.host, "-p", str(self.port)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError) as exc:
                if self.proc.poll() is not None or time.monotonic() - started > timeout:
                    self.stop()
                    raise RuntimeError(
                        f"moto_server did not answer on {self.endpoint_url}"
                    ) from exc
                time.sleep(0.02)
        logger.info(
            "moto S3 server on %s after %.2fs", self.endpoint_url, time.monotonic() - started
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@contextmanager
def moto_s3_store(
    prefix: str = "modelyard", host: str = "127.0.0.1", netns: str | None = None
) -> Iterator[S3Store]:
    """A running moto S3 server with one bucket (on `host` in `netns`, see MotoServer);
    yields the store under `prefix` in it and stops the server afterwards (everything in it
    is gone)."""
    server = MotoServer(host, netns)
    server.start()
    try:
        options = {
            "endpoint_url": server.endpoint_url,
            "key": "modelyard-test",
            "secret": secrets.token_hex(16),
        }
        store = S3Store(url=f"s3://{BUCKET}/{prefix}", options=options)
        store.filesystem().mkdir(BUCKET)
        yield store
    finally:
        server.stop()
