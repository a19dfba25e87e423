"""The API process: `python -m api.serve api`, which `modelyard api` and `modelyard up`
start (the client package never imports api/)."""

from __future__ import annotations

import os
from typing import Annotated

import typer
import uvicorn

from core.logs import configure_logging
from core.settings import get_settings

app = typer.Typer(help="The Modelyard HTTP API.")


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="Port")] = None,
) -> None:
    """Run the HTTP API (runs migrations first unless MODELYARD_AUTO_MIGRATE=false)."""
    settings = get_settings()
    configure_logging(settings)
    if settings.api_workers > 1 and settings.auto_migrate:
        # Migrate once here, not in every server process at the same time.
        from db.session import migrate as run_migrations

        run_migrations(settings.database_url)
        os.environ["MODELYARD_AUTO_MIGRATE"] = "false"
    uvicorn.run(
        "api.main:create_server_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        workers=settings.api_workers,
        # open event streams would otherwise hold a SIGTERM off indefinitely
        timeout_graceful_shutdown=5,
    )


# A single-command app would take its arguments without the command's name; the
# callback keeps `python -m api.serve api --port N` in the shape of the other entry points.
@app.callback()
def main() -> None:
    """The Modelyard HTTP API."""


if __name__ == "__main__":
    app(prog_name="modelyard")
