"""The `dermsight` command: data | train | predict | evaluate | calibrate | serve | keys | audit.

One module per command group; each parses its options, calls one function of the layers below
and prints. A new command is a module here with a `register(app)` function, named in COMMANDS
(in the order `dermsight --help` lists them)."""

from __future__ import annotations

import typer

from dermsight.cli import audit, calibrate, data, evaluate, keys, predict, serve, train

app = typer.Typer(help="DermSight: melanoma decision support from dermoscopic images.", no_args_is_help=True)

COMMANDS = (data, train, predict, evaluate, calibrate, serve, keys, audit)
for command in COMMANDS:
    command.register(app)


def main() -> None:
    """Run the `dermsight` command line."""
    app()
