"""What every command module shares: the consoles, the sources help text, error exits."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from dermsight.data.records import Loaded
from dermsight.data.sources import READERS

console = Console()
errors = Console(stderr=True)

SOURCES_HELP = f"Dataset paths, optionally prefixed FORMAT: (one of {', '.join(READERS)})."
MODEL_HELP = "Bundle directory (default: the committed default bundle)."
DATA_DIR_HELP = "The server's --data-dir (default: $DERMSIGHT_DATA_DIR or ./.dermsight); $DERMSIGHT_DATABASE_URL applies."
SITE_HELP = "A site profile (`dermsight calibrate`): its recalibrated melanoma_risk, threshold and unsure apply."


def fail(message: object, code: int = 1) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """Print a warning (in yellow) on stdout."""
    console.print(f"[yellow]{message}[/]", highlight=False)


def exit_if_unreadable_sources(loaded: Loaded) -> None:
    """A source that cannot be read at all (no such path, a CSV missing a column) is an
    error, not a footnote: say so on stderr (JSON on stdout stays valid) and exit 1."""
    failed = [p for p in loaded.problems if p.kind == "unreadable_source"]
    for problem in failed:
        errors.print(f"[bold red]error:[/] cannot read {problem.where}: {problem.message}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def web_storage(data_dir: Path | None):
    """The web app's storage at `data_dir` (or $DERMSIGHT_DATABASE_URL), as `dermsight serve` opens it."""
    from dermsight.serving.app import resolve_locations
    from dermsight.serving.storage.repository import Storage

    storage_dir, database_url = resolve_locations(data_dir)
    return Storage(database_url, storage_dir)
