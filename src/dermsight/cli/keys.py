"""`dermsight keys`: the web app's API keys."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from dermsight.cli.common import DATA_DIR_HELP, console, errors, fail, web_storage

keys_app = typer.Typer(help="API keys of the web app (stored as SHA-256 hashes in its database).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `dermsight keys` to `app`."""
    app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Who or what the key is for (a person, a clinic system)."),
    role: str = typer.Option(
        "clinician", "--role", help="read (view), clinician (also upload, score, add patients) or admin (also delete)."
    ),
    data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
) -> None:
    """Create a key and print it once: only its hash is kept, so it cannot be shown again."""
    from dermsight.serving.security import create_api_key

    try:
        key = create_api_key(web_storage(data_dir), name, role=role)
    except ValueError as err:
        fail(err, 2)
    print(key)
    errors.print(f"API key for {name.strip()!r} ({role}) created; it is shown only this once.", highlight=False)


@keys_app.command("list")
def keys_list(data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP)) -> None:
    """Every key: id, name, role, public prefix, when created and revoked (never the key)."""
    table = Table(title="API keys")
    for column in ("id", "name", "role", "prefix", "created", "revoked"):
        table.add_column(column)
    for key in web_storage(data_dir).list_api_keys():
        revoked = key.revoked_at.strftime("%Y-%m-%d %H:%M") if key.revoked_at else ""
        table.add_row(str(key.id), escape(key.name), key.role, key.prefix, key.created_at.strftime("%Y-%m-%d %H:%M"),
                      revoked)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    which: str = typer.Argument(..., help="The key's id, prefix or name (a name revokes all its active keys)."),
    data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
) -> None:
    """Revoke keys: they stop working within seconds, browser sessions signed in with them too."""
    from dermsight.serving.security import revoke_api_keys

    revoked = revoke_api_keys(web_storage(data_dir), which)
    if not revoked:
        fail(f"no active key with id, prefix or name {which!r}")
    for key in revoked:
        console.print(f"revoked key {key.id} ({key.name}, {key.prefix})", highlight=False)
