"""The worker-side processes: `python -m workers.serve worker|beat|flower|workers|convert-gguf`.

`modelyard worker`, `beat`, `flower` and `workers` run this module in their own process
(exec, so signals reach the worker itself); the client package never imports workers/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Annotated

import typer
from rich.console import Console

from core.dispatch import check_broker_timeouts
from core.errors import ConfigurationError
from core.logs import configure_logging
from core.settings import get_settings

app = typer.Typer(help="Modelyard worker processes.")
console = Console()

MIN_FLOWER_PASSWORD = 12


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues")
    ] = "generate,train,maintenance",
    gpus: Annotated[
        str,
        typer.Option(
            help="'' for the default device; 'all' or '0,1': this worker owns those GPUs and "
            "trains each fine-tune across them (one torchrun process per GPU, NCCL)"
        ),
    ] = "",
    worker_per_gpu: Annotated[
        bool,
        typer.Option(
            "--worker-per-gpu",
            help="With --gpus: one worker process per GPU instead, each taking its own jobs",
        ),
    ] = False,
    procs: Annotated[
        int,
        typer.Option(
            min=0,
            help="Processes each fine-tune trains in (torchrun, DDP over gloo on CPU); "
            "0: MODELYARD_TRAINING_PROCS (default 1)",
        ),
    ] = 0,
    pool: Annotated[
        str,
        typer.Option(
            help="'solo' runs the job in the worker process (SIGTERM hands a running job "
            "back); 'prefork' runs it in one child process"
        ),
    ] = "solo",
) -> None:
    """Run a worker: one job at a time; fine-tunes train in child processes (--procs, --gpus)."""
    if gpus and not worker_per_gpu:
        os.environ.update(devices_environment(_gpu_ids(gpus), procs))
    elif procs:
        os.environ["MODELYARD_TRAINING_PROCS"] = str(procs)
    get_settings.cache_clear()
    settings = get_settings()
    configure_logging(settings)
    if pool not in ("solo", "prefork"):
        console.print(f"[red]--pool must be solo or prefork, not {pool!r}[/red]")
        raise typer.Exit(2)
    try:
        check_broker_timeouts(settings)
    except ConfigurationError as exc:
        console.print(f"[red]refusing to start the worker:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    if gpus and worker_per_gpu:
        _run_per_gpu(queues, _gpu_ids(gpus))
        return
    from workers.app import celery_app

    hostname = f"worker-{os.getpid()}@%h"
    celery_app.worker_main(
        [
            "worker",
            "--queues",
            queues,
            "--pool",
            pool,
            "--concurrency",
            "1",
            "--without-mingle",
            "--without-gossip",
            "--hostname",
            hostname,
            "--loglevel",
            settings.log_level,
        ]
    )


def devices_environment(gpu_ids: list[str], procs: int = 0) -> dict[str, str]:
    """A worker that owns `gpu_ids`: it sees only those, and trains each fine-tune on all
    of them, one process per GPU (`procs`, when given, instead)."""
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(gpu_ids),
        "MODELYARD_DEVICE": "cuda",
        "MODELYARD_TRAINING_PROCS": str(procs or len(gpu_ids)),
    }


def _gpu_ids(gpus: str) -> list[str]:
    if gpus == "all":
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    else:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids:
        console.print("[red]no GPUs found[/red]")
        raise typer.Exit(2)
    return ids


def _run_per_gpu(queues: str, ids: list[str]) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-P", "-m", "workers.serve", "worker", "--queues", queues],
            env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "MODELYARD_DEVICE": "cuda"},
        )
        for gpu in ids
    ]
    try:
        for child in children:
            child.wait()
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()


@app.command()
def workers(
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 when a worker stopped consuming")
    ] = False,
    name: Annotated[str | None, typer.Option(help="Only this worker (its Celery hostname)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines")] = False,
) -> None:
    """List the workers with what they do; `--check` is a readiness/liveness probe."""
    from workers.readiness import check_workers

    settings = get_settings()
    configure_logging(settings)
    try:
        found = check_workers(settings)
    except Exception as exc:
        console.print(f"[red]cannot check the workers:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from exc
    if name is not None:
        found = [w for w in found if w.hostname == name]
        if not found:
            console.print(f"[red]worker {name} is not reporting[/red]")
            raise typer.Exit(1)
    for w in found:
        if as_json:
            typer.echo(json.dumps(dataclasses.asdict(w), default=str))
            continue
        doing = f"running {w.job}" if w.busy else f"last active {w.idle_s:.0f}s ago"
        typer.echo(
            f"{w.hostname}  {w.verdict:<8} {doing}  queues={','.join(w.queues)}  "
            f"waiting={w.waiting}"
        )
    if not found and not as_json:
        typer.echo("no worker is reporting")
    if check and (not found or any(not w.ready for w in found)):
        raise typer.Exit(1)


@app.command()
def beat() -> None:
    """Run the scheduler that triggers the reconciler every reconcile period."""
    settings = get_settings()
    configure_logging(settings)
    from workers.app import celery_app

    schedule = settings.data_dir.resolve() / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", "--schedule", str(schedule), "--loglevel", settings.log_level])


@app.command()
def flower(
    host: Annotated[str | None, typer.Option(help="Address to bind (default: loopback)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: settings)")] = None,
) -> None:
    """Run Flower (workers, tasks, Prometheus /metrics) behind basic auth."""
    settings = get_settings()
    configure_logging(settings)
    password = settings.flower_password.get_secret_value() if settings.flower_password else ""
    if not settings.flower_user or len(password) < MIN_FLOWER_PASSWORD:
        console.print(
            "[red]refusing to start Flower without basic auth:[/red] set MODELYARD_FLOWER_USER "
            f"and MODELYARD_FLOWER_PASSWORD (at least {MIN_FLOWER_PASSWORD} characters)"
        )
        raise typer.Exit(2)
    from workers.app import celery_app

    # Through Flower's environment, not argv, so the password is not in the process list.
    os.environ["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{password}"
    celery_app.start(
        [
            "flower",
            f"--address={host or settings.flower_host}",
            f"--port={port or settings.flower_port}",
            f"--logging={settings.log_level.lower()}",
        ]
    )


@app.command("convert-gguf")
def convert_gguf_command(
    package: Annotated[str, typer.Argument(help="The package that ships the GGUF")],
    name: Annotated[str, typer.Argument(help="The model's directory name in the models dir")],
) -> None:
    """Convert a packaged GGUF into a safetensors model directory (once); prints its path."""
    from workers.generation.convert import convert_gguf, packaged_gguf

    settings = get_settings()
    configure_logging(settings)
    typer.echo(convert_gguf(packaged_gguf(package), settings.models_dir / name))


if __name__ == "__main__":
    app(prog_name="modelyard")
