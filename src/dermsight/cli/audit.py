"""`dermsight audit`: the web app's audit trail (who changed what, sign-ins, key changes)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from dermsight.cli.common import DATA_DIR_HELP, console, web_storage


def register(app: typer.Typer) -> None:
    """Add `dermsight audit` to `app`."""
    app.command("audit")(audit_command)


def audit_command(
    key: str = typer.Option(None, "--key", help="Only this key's rows (its name or prefix)."),
    action: str = typer.Option(
        None, "--action", help="Only this action (e.g. patient.delete; 'patient': all patient.*)."
    ),
    outcome: str = typer.Option(None, "--outcome", help="done, refused or failed."),
    since: datetime = typer.Option(
        None, "--since", help="From this time (ISO, UTC), e.g. 2026-12-01 or 2026-12-01T08:00."
    ),
    until: datetime = typer.Option(None, "--until", help="Before this time (ISO, UTC)."),
    limit: int = typer.Option(200, min=1, help="At most this many rows (the newest)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row instead of a table."),
    data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
) -> None:
    """The audit trail: every state-changing request (and sign-in) with its time, key, action,
    the ids it touched and how it ended; keys created and revoked. Oldest first."""
    from dermsight.serving.audit import event_record

    utc = [None if t is None else t.replace(tzinfo=t.tzinfo or UTC) for t in (since, until)]
    events = web_storage(data_dir).audit_events(key=key, action=action, outcome=outcome, since=utc[0],
                                                 until=utc[1], limit=limit)
    records = [event_record(event) for event in events]
    if as_json:
        for record in records:
            print(json.dumps(record))
        return
    table = Table(title=f"Audit trail ({len(records)} rows)")
    for column in records[0] if records else ("at", "action"):
        table.add_column(column)
    for record in records:
        table.add_row(*(escape("" if value is None else str(value)) for value in record.values()))
    console.print(table)
