"""`modelyard submit | jobs | show | watch | events | logs | cancel | pause | resume |
outputs | tensorboard`: the HTTP API from the shell. Exit codes scripts can rely on: 0
succeeded (or the command worked), 1 failed, 3 cancelled, 4 expired, 5 the API refused or
could not be reached, 6 still running when `watch --timeout` ran out, 7 `watch` found the
job paused."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from modelyard.client import TERMINAL_STATUSES, Client, ModelyardAPIError

console = Console()
errors = Console(stderr=True)

RESTING = TERMINAL_STATUSES | {"paused"}  # watch stops at these
EXIT_FOR_STATUS = {"succeeded": 0, "failed": 1, "cancelled": 3, "expired": 4}
EXIT_API = 5
EXIT_TIMEOUT = 6
EXIT_PAUSED = 7
SPARK = "▁▂▃▄▅▆▇█"

UrlOption = Annotated[str, typer.Option("--url", envvar="MODELYARD_URL", help="API base URL")]
KeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="MODELYARD_API_KEY", help="API key", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]


def _client(url: str, api_key: str | None) -> Client:
    return Client(url, api_key=api_key)


def _call(fn: Callable[[], Any]) -> Any:
    """Run an API call; a refusal or an unreachable API exits 5 with the typed error."""
    try:
        return fn()
    except ModelyardAPIError as exc:
        errors.print(f"[red]{exc.status_code} {exc.type}[/red]: {exc.message}")
        raise typer.Exit(EXIT_API) from None
    except httpx.HTTPError as exc:
        errors.print(f"[red]cannot reach the API[/red]: {exc}")
        raise typer.Exit(EXIT_API) from None


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _parse_value(text: str) -> Any:
    """A `--set` value: JSON when it parses (numbers, lists, true), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _apply_settings(spec: dict[str, Any], settings: list[str]) -> dict[str, Any]:
    """`key=value` and `dotted.key=value` assignments onto the spec."""
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is not key=value")
        target = spec
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {item!r}: {part} is not an object")
        target[leaf] = _parse_value(value)
    return spec


def read_spec_file(path: Path) -> Any:
    """A spec from a JSON file, or a YAML one (.yaml / .yml)."""
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        return yaml.safe_load(text)
    return json.loads(text)


def submit(
    kind: Annotated[str, typer.Argument(help="generate | finetune | predict | batch | noop")],
    spec_file: Annotated[
        Path | None,
        typer.Option("--spec", help="The spec as a JSON or YAML (.yaml/.yml) file", exists=True),
    ] = None,
    spec_json: Annotated[str | None, typer.Option("--spec-json", help="The spec as JSON")] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Set a spec field: key=value, dotted keys for nested fields "
            "(hyperparameters.epochs=2); values are JSON when they parse.",
        ),
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="key=value, repeatable")
    ] = None,
    priority: Annotated[int, typer.Option(help="0 (lowest) to 9")] = 0,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a job from flags, a JSON/YAML spec file, or both; prints its id (or the job
    as JSON)."""
    if spec_file is not None and spec_json is not None:
        errors.print("give --spec or --spec-json, not both")
        raise typer.Exit(2)
    try:
        spec = read_spec_file(spec_file) if spec_file else json.loads(spec_json or "{}")
        if not isinstance(spec, dict):
            raise ValueError("the spec must be an object")
        _apply_settings(spec, settings or [])
        labels = _apply_settings({}, metadata or [])
    except (ValueError, yaml.YAMLError) as exc:
        errors.print(f"bad spec: {exc}")
        raise typer.Exit(2) from None
    with _client(url, api_key) as client:
        job = _call(lambda: client.submit(kind, spec, priority=priority, metadata=labels))
    if as_json:
        _print_json(job)
    else:
        console.print(job["id"])


def jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs with this status")] = None,
    kind: Annotated[str | None, typer.Option(help="Only jobs of this kind")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """The newest jobs, with filters."""
    params = {k: v for k, v in {"status": status, "kind": kind, "limit": limit}.items() if v}
    with _client(url, api_key) as client:
        page = _call(lambda: client.list_jobs(**params))
    if as_json:
        _print_json(page)
        return
    table = Table("id", "kind", "status", "progress", "created")
    for job in page["data"]:
        table.add_row(
            job["id"],
            job["kind"],
            job["status"],
            f"{job['progress'] * 100:.0f}%",
            job["created_at"],
        )
    console.print(table)


def show(
    job_id: str,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """One job as JSON."""
    with _client(url, api_key) as client:
        _print_json(_call(lambda: client.get(job_id)))


def cancel(
    job_id: str,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a job (a running one stops at its next step)."""
    with _client(url, api_key) as client:
        job = _call(lambda: client.cancel(job_id))
    if as_json:
        _print_json(job)
        return
    console.print(f"{job['id']}: {job['status']} (cancel requested)")


def pause(
    job_id: str,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """Pause a fine-tune (a running one checkpoints at its next step, then rests paused)."""
    with _client(url, api_key) as client:
        job = _call(lambda: client.pause(job_id))
    console.print(f"{job['id']}: {job['status']} (pause requested)")


def resume(
    job_id: str,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """Resume a paused fine-tune from its latest checkpoint."""
    with _client(url, api_key) as client:
        job = _call(lambda: client.resume(job_id))
    console.print(f"{job['id']}: {job['status']} (resumed)")


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    else:
        console.print(f"{event['created_at']}  {event['type']:<8} {event['message']}")


def events(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until the job ends")
    ] = False,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """A job's events so far (with --follow: live, until the job ends)."""
    with _client(url, api_key) as client:
        if follow:

            def follow_events() -> None:
                for event in client.iter_events(job_id):
                    _print_event(event, as_json)

            _call(follow_events)
            return
        found = _call(lambda: client.events(job_id))
    for event in found:
        _print_event(event, as_json)


def logs(
    job_id: str,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Follow a job's events live until it ends (`events --follow`)."""
    events(job_id, follow=True, url=url, api_key=api_key, as_json=as_json)


def outputs(
    job_id: str,
    fmt: Annotated[str, typer.Option("--format", help="jsonl | csv")] = "jsonl",
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """A job's generated outputs on stdout, as JSON lines or CSV."""
    if fmt not in ("jsonl", "csv"):
        errors.print("--format is jsonl or csv")
        raise typer.Exit(2)
    with _client(url, api_key) as client:
        rows = _call(lambda: client.outputs(job_id))
    if fmt == "jsonl":
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    fields = ["prompt_index", "sequence_index", "text", "finish_reason"]
    fields += ["prompt_tokens", "completion_tokens"]
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def unpack_tensorboard(archive: bytes, folder: Path) -> None:
    """The API's .tar.gz into `folder` (tarfile's `data` filter: nothing lands outside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")


def tensorboard(
    job_id: str,
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Only unpack the event files into this folder"),
    ] = None,
    port: Annotated[int, typer.Option("--port", help="Port TensorBoard serves on")] = 6006,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """Open a fine-tune's TensorBoard event files (one run per attempt) in TensorBoard on
    127.0.0.1 until Ctrl-C; with --output, unpack them there instead. The job must have
    run with tracking on (`tracking: ["tensorboard"]` or MODELYARD_TRACKING)."""
    with _client(url, api_key) as client:
        archive = _call(lambda: client.tensorboard(job_id))
    if output is not None:
        unpack_tensorboard(archive, output)
        console.print(f"event files of {job_id} in {output}")
        return
    with tempfile.TemporaryDirectory(prefix=f"{job_id}-tensorboard-") as folder:
        unpack_tensorboard(archive, Path(folder))
        console.print(f"TensorBoard for {job_id} on http://127.0.0.1:{port} (Ctrl-C stops it)")
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", folder]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reached TensorBoard too
            subprocess.run(command, check=False)


def sparkline(values: list[float], width: int = 40) -> str:
    """The last `width` values as block characters, lowest to highest."""
    tail = values[-width:]
    if not tail:
        return ""
    low, high = min(tail), max(tail)
    span = (high - low) or 1.0
    return "".join(SPARK[min(int((v - low) / span * len(SPARK)), len(SPARK) - 1)] for v in tail)


def _describe(job: dict[str, Any]) -> str:
    detail = job.get("progress_detail") or {}
    parts = [job["status"]]
    if "step" in detail and "total_steps" in detail:
        parts.append(f"step {detail['step']}/{detail['total_steps']}")
    if detail.get("loss") is not None:
        parts.append(f"loss {detail['loss']:.4f}")
    if detail.get("eta_s") is not None:
        parts.append(f"ETA {detail['eta_s']:.0f}s")
    queue = job.get("queue")
    if queue:
        parts.append(f"queue {queue['name']} {queue['position']}/{queue['depth']}")
    return "  ".join(parts)


def watch(
    job_id: str,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 86_400,
    interval: Annotated[float, typer.Option(help="Seconds between polls")] = 0.5,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Follow a job live (progress bar, step, loss, ETA, loss chart) until it ends."""
    display = errors if as_json else console  # --json keeps stdout for the JSON alone
    progress = Progress(
        TextColumn("[bold]{task.fields[job]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.description}"),
        console=display,
    )
    task = progress.add_task("", total=1.0, job=job_id)
    chart = Text()
    losses: list[float] = []
    after = 0
    deadline = time.monotonic() + timeout
    with _client(url, api_key) as client, Live(Group(progress, chart), console=display) as live:
        while True:
            job = _call(lambda: client.get(job_id))
            for point in _call(functools.partial(client.metrics, job_id, after=after)):
                after = max(after, int(point["id"]))
                if point["name"] == "train_loss":
                    losses.append(float(point["value"]))
            progress.update(task, completed=float(job["progress"]), description=_describe(job))
            if losses:
                chart.plain = f"loss {sparkline(losses)}  {losses[0]:.3f} -> {losses[-1]:.3f}"
            live.refresh()
            if job["status"] in RESTING or time.monotonic() >= deadline:
                break
            time.sleep(interval)
    if not display.is_terminal:
        display.line()  # Live's last frame ends without a newline when not on a terminal
    if as_json:
        _print_json(job)
    if job["status"] == "paused":
        if not as_json:
            console.print(f"{job_id} paused (continue with `modelyard resume {job_id}`)")
        raise typer.Exit(EXIT_PAUSED)
    if job["status"] not in TERMINAL_STATUSES:
        errors.print(f"{job_id} still {job['status']} after {timeout:g}s")
        raise typer.Exit(EXIT_TIMEOUT)
    error = job.get("error") or {}
    line = f"{job_id} {job['status']}"
    if error:
        line += f": {error.get('type')}: {error.get('message')}"
    if not as_json:
        console.print(line)
    raise typer.Exit(EXIT_FOR_STATUS.get(job["status"], 1))


def register(app: typer.Typer) -> None:
    commands = (submit, jobs, show, watch, events, logs, cancel, pause, resume, outputs)
    for command in (*commands, tensorboard):
        app.command()(command)
