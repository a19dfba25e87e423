"""Runs a module as `python -m` would and, when the process exits, writes the names of
every module it imported to the file named by MODULE_REPORT, one a line.

`python -m tests.support.module_report api.serve api --port N` is the API process that
`modelyard api` execs, with that one exit hook added, so a test can ask the real server
what it loaded (tests/api/test_api_process_imports.py).
"""

from __future__ import annotations

import atexit
import os
import runpy
import signal
import sys
from pathlib import Path
from types import FrameType

TERMINATED = 128 + signal.SIGTERM


def _write_report(path: Path) -> None:
    path.write_text("\n".join(sorted(sys.modules)) + "\n")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # The default action would end the process without running exit hooks; uvicorn
    # restores this handler and raises the signal again once it has shut down.
    raise SystemExit(TERMINATED)


def main() -> None:
    report = Path(os.environ["MODULE_REPORT"])
    module, *args = sys.argv[1:]
    atexit.register(_write_report, report)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
