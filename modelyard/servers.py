"""The server processes the CLI starts. The API, the workers, beat, Flower and the database
administration live in api/, workers/ and db/, which this package never imports: it runs
their entry modules as processes (`python -m api.serve api`, ...).

`-P` keeps the working directory off `sys.path`, so a folder named like one of the
server packages (`api/`, `db/`) where `modelyard` is run cannot stand in for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from core.settings import Settings

API = "api.serve"
WORKERS = "workers.serve"
DATABASE_ADMIN = "db.admin"


def module_argv(module: str, *args: str) -> list[str]:
    """The command line that runs `module` with this interpreter."""
    return [sys.executable, "-P", "-m", module, *args]


def exec_module(module: str, args: Sequence[str]) -> NoReturn:
    """Become `python -m module args`: the same process id, so signals, exit codes and
    `docker stop` reach the server itself, not a parent waiting on it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, module_argv(module, *args))


def settings_env(settings: Settings) -> dict[str, str]:
    """This environment with `settings`' data dir and database, for a child process."""
    return {
        **os.environ,
        "MODELYARD_DATA_DIR": str(settings.data_dir.resolve()),
        "MODELYARD_DATABASE_URL": settings.database_url,
    }


def run_module(settings: Settings, module: str, *args: str) -> str:
    """Run `module` to its end on `settings`; its standard output. RuntimeError, with what
    it wrote to standard error, when it fails."""
    done = subprocess.run(
        module_argv(module, *args),
        env=settings_env(settings),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"`{module} {' '.join(args[:2])}` exited with {done.returncode}: {done.stderr.strip()}"
        )
    return done.stdout


def create_key(
    settings: Settings, name: str, scopes: Sequence[str], tenant: str | None = None
) -> str:
    """Create an API key in `settings`' database (migrating it first), in the default
    tenant unless `tenant` is named; returns the key, shown once."""
    args = ["keys", "create", "--name", name]
    for scope in scopes:
        args += ["--scope", scope]
    if tenant is not None:
        args += ["--tenant", tenant]
    return run_module(settings, DATABASE_ADMIN, *args).strip().splitlines()[-1]


def install_packaged_gguf(settings: Settings, package: str, name: str) -> Path:
    """Convert the GGUF that `package` ships into `models_dir / name` (once); its path."""
    output = run_module(settings, WORKERS, "convert-gguf", package, name)
    return Path(output.strip().splitlines()[-1])
