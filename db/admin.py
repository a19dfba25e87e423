"""`modelyard migrate`, `modelyard tenants create|list` and `modelyard keys
create|list|revoke`: `python -m db.admin ...`, which the CLI starts.

These work on the database directly (through the settings), so the first admin key is
made without one: `modelyard keys create --name admin --scope admin`. The client package
never imports db/; its commands run this module as a process.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from core.errors import ModelyardError
from core.logs import configure_logging
from core.settings import Settings, get_settings
from db import tenants as repo
from db.models import DEFAULT_TENANT
from db.session import migrate, session_scope

console = Console()
errors = Console(stderr=True)

app = typer.Typer(help="Database administration: schema, tenants and API keys.")

tenants_app = typer.Typer(help="Tenants (straight on the database).")
keys_app = typer.Typer(help="API keys (straight on the database).")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]
TenantOption = Annotated[str, typer.Option("--tenant", help="Tenant id or name", show_default=True)]


def create_key(
    settings: Settings, name: str, scopes: list[str], tenant: str = DEFAULT_TENANT
) -> str:
    """Create a key in the database (migrating it first); returns the key, shown once."""
    migrate(settings.database_url)
    with session_scope(settings.database_url) as session:
        tenant_id = repo.require_tenant(session, tenant).id
        new = repo.create_key(session, tenant_id, name, scopes)
        repo.audit(
            session,
            tenant_id=tenant_id,
            key_id=None,
            action="key.create",
            target_type="api_key",
            target_id=new.row.id,
        )
        return new.secret


def _fail(exc: ModelyardError) -> typer.Exit:
    errors.print(f"[red]{exc.message}[/red]")
    return typer.Exit(2)


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="A unique name")],
    requests_per_minute: Annotated[int | None, typer.Option(min=1)] = None,
    max_queued_jobs: Annotated[int | None, typer.Option(min=1)] = None,
    max_running_jobs: Annotated[int | None, typer.Option(min=1)] = None,
    max_dataset_bytes: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Create a tenant; prints its id."""
    settings = get_settings()
    migrate(settings.database_url)
    try:
        with session_scope(settings.database_url) as session:
            tenant = repo.create_tenant(
                session,
                name,
                requests_per_minute=requests_per_minute,
                max_queued_jobs=max_queued_jobs,
                max_running_jobs=max_running_jobs,
                max_dataset_bytes=max_dataset_bytes,
            )
            repo.audit(
                session,
                tenant_id=tenant.id,
                key_id=None,
                action="tenant.create",
                target_type="tenant",
                target_id=tenant.id,
            )
            tenant_id = tenant.id
    except ModelyardError as exc:
        raise _fail(exc) from None
    typer.echo(tenant_id)


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    """Rows as a JSON array, or as a table with their keys as the header."""
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(*(rows[0] if rows else ()))
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row.values()))
    console.print(table)


def _when(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


@tenants_app.command("list")
def tenants_list(as_json: JsonOption = False) -> None:
    """Tenants with their quota overrides (none: the installation's default applies)."""
    settings = get_settings()
    migrate(settings.database_url)
    with session_scope(settings.database_url, readonly=True) as session:
        rows = [
            {
                "id": t.id,
                "name": t.name,
                "requests_per_minute": t.requests_per_minute,
                "max_queued_jobs": t.max_queued_jobs,
                "max_running_jobs": t.max_running_jobs,
                "max_dataset_bytes": t.max_dataset_bytes,
                "created_at": _when(t.created_at),
            }
            for t in repo.list_tenants(session)
        ]
    _print_rows(rows, as_json)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="What the key is for")],
    scope: Annotated[
        list[str],
        typer.Option("--scope", help=f"Repeatable: {', '.join(repo.SCOPES)}"),
    ],
    tenant: TenantOption = DEFAULT_TENANT,
) -> None:
    """Create a key and print it: it is shown this once, only its hash is stored."""
    try:
        secret = create_key(get_settings(), name, scope, tenant)
    except ModelyardError as exc:
        raise _fail(exc) from None
    errors.print("[yellow]store this key now; it is not shown again[/yellow]")
    typer.echo(secret)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant")] = None,
    as_json: JsonOption = False,
) -> None:
    """Keys with their prefix, scopes and last use (never the keys themselves)."""
    settings = get_settings()
    migrate(settings.database_url)
    try:
        with session_scope(settings.database_url, readonly=True) as session:
            tenant_id = repo.require_tenant(session, tenant).id if tenant else None
            rows = [
                {
                    "id": k.id,
                    "tenant": k.tenant_id,
                    "name": k.name,
                    "prefix": k.prefix,
                    "scopes": " ".join(k.scopes),
                    "last_used_at": _when(k.last_used_at),
                    "revoked_at": _when(k.revoked_at),
                }
                for k in repo.list_keys(session, tenant_id)
            ]
    except ModelyardError as exc:
        raise _fail(exc) from None
    _print_rows(rows, as_json)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key_...)")]) -> None:
    """Revoke a key: requests with it are refused (401) from now on."""
    settings = get_settings()
    migrate(settings.database_url)
    try:
        with session_scope(settings.database_url) as session:
            key = repo.revoke_key(session, key_id, tenant_id=None)
            repo.audit(
                session,
                tenant_id=key.tenant_id,
                key_id=None,
                action="key.revoke",
                target_type="api_key",
                target_id=key.id,
            )
    except ModelyardError as exc:
        raise _fail(exc) from None
    console.print(f"revoked {key_id}")


@app.command("migrate")
def migrate_command() -> None:
    """Bring the database schema up to date (`alembic upgrade head`)."""
    settings = get_settings()
    configure_logging(settings)
    migrate(settings.database_url)


app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")

if __name__ == "__main__":
    app(prog_name="modelyard")
