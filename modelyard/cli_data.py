"""`modelyard datasets upload|list|show|delete` and `modelyard models list|show|delete`:
the files jobs train on and the models they register, from the shell (same exit codes
and `--json` as the job commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modelyard.cli_jobs import (
    JsonOption,
    KeyOption,
    UrlOption,
    _call,
    _client,
    _print_json,
    console,
)

datasets_app = typer.Typer(help="Datasets: upload training, validation and batch files.")
models_app = typer.Typer(help="Models registered by fine-tuning jobs.")


def _deleted(resource_id: str, as_json: bool) -> None:
    if as_json:
        _print_json({"id": resource_id, "deleted": True})
    else:
        console.print(f"{resource_id} deleted")


@datasets_app.command("upload")
def upload_dataset(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL or CSV file")],
    name: Annotated[str | None, typer.Option(help="File name to record (default: its own)")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a dataset; it is validated on the way in. Prints its id (or it as JSON)."""
    with _client(url, api_key) as client:
        dataset = _call(lambda: client.upload_dataset(path, name=name))
    if as_json:
        _print_json(dataset)
    else:
        console.print(dataset["id"])


@datasets_app.command("list")
def list_datasets(
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """The newest datasets."""
    with _client(url, api_key) as client:
        page = _call(lambda: client.datasets(limit=limit))
    if as_json:
        _print_json(page)
        return
    table = Table("id", "file", "schema", "rows", "labels", "created")
    for ds in page["data"]:
        labels = ", ".join(ds["labels"][:6]) + (" ..." if len(ds["labels"]) > 6 else "")
        table.add_row(
            ds["id"], ds["filename"], ds["schema"], str(ds["rows"]), labels, ds["created_at"]
        )
    console.print(table)


@datasets_app.command("show")
def show_dataset(
    dataset_id: str,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """One dataset as JSON (with its validation report)."""
    with _client(url, api_key) as client:
        _print_json(_call(lambda: client.dataset(dataset_id)))


@datasets_app.command("delete")
def delete_dataset(
    dataset_id: str,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    with _client(url, api_key) as client:
        _call(lambda: client.delete_dataset(dataset_id))
    _deleted(dataset_id, as_json)


@models_app.command("list")
def list_models(
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """The newest registered models."""
    with _client(url, api_key) as client:
        page = _call(lambda: client.models(limit=limit))
    if as_json:
        _print_json(page)
        return
    table = Table("name", "base", "task", "method", "job", "created")
    for m in page["data"]:
        method = m["method"] + (" (adapter)" if m["adapter"] else "")
        table.add_row(
            m["name"], m["base_model"], m["task"], method, m["job_id"] or "", m["created_at"]
        )
    console.print(table)


@models_app.command("show")
def show_model(
    name: str,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
) -> None:
    """One registered model as JSON (labels, metrics, the job that made it)."""
    with _client(url, api_key) as client:
        _print_json(_call(lambda: client.model(name)))


@models_app.command("delete")
def delete_model(
    name: str,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a registered model and its files."""
    with _client(url, api_key) as client:
        _call(lambda: client.delete_model(name))
    _deleted(name, as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(datasets_app, name="datasets")
    app.add_typer(models_app, name="models")
