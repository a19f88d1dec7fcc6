"""The ``mcrelay`` command: the daemon, the client commands, and the traffic tools.

Each command is synchronous and runs trio itself. Errors reach the user as one line on stderr
(one per error when several happened at once) and a non-zero exit code, never as a traceback.
This module only assembles the app; the commands live one group per module:

- `mcrelay.cli.daemon`: ``supervisor``, which hands its options to the supervisor package;
- `mcrelay.cli.rules`: ``add``, ``remove``, ``rules`` and the ``config`` group;
- `mcrelay.cli.status`: ``ping``, ``workers``, ``stats``, ``log-level``, ``restart-worker``;
- `mcrelay.cli.top`: ``top``;
- `mcrelay.cli.traffic`: ``gen`` and ``sink``.

The client commands talk to the daemon through `mcrelay.client` alone (`mcrelay.cli.common`).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mcrelay import __version__
from mcrelay.cli import rules, status
from mcrelay.cli.daemon import supervisor_command
from mcrelay.cli.top import top_command
from mcrelay.cli.traffic import gen_command, sink_command
from mcrelay.errors import leaves, split

__all__ = ["app", "main"]

app = typer.Typer(
    name="mcrelay",
    help="Relay multicast UDP across boundaries that kernel routing cannot cross.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# Registered in the order --help lists them.
app.command("gen")(gen_command)
app.command("sink")(sink_command)
app.command("top")(top_command)
app.command("supervisor")(supervisor_command)
app.add_typer(rules.config_app, name="config")
app.command("ping")(status.ping)
app.command("workers")(status.workers)
app.command("add")(rules.add)
app.command("remove")(rules.remove)
app.command("rules")(rules.list_rules)
app.command("stats")(status.stats)
app.command("log-level")(status.log_level)
app.command("restart-worker")(status.restart_worker)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mcrelay {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Relay multicast UDP across boundaries that kernel routing cannot cross."""


def main() -> None:
    """Console entry point: nothing but one-line messages escape to the user. Ctrl-C (alone, or
    inside a group with nothing else) is exit code 130; a bug is each of its errors on a line
    of its own and exit code 70."""
    try:
        app()
    except SystemExit:
        raise
    except BaseException as exc:  # last resort: a bug must still not print a traceback
        _, rest = split(exc, KeyboardInterrupt)
        if rest is None:
            sys.exit(130)
        bugs = leaves(rest)
        if not all(isinstance(bug, Exception) for bug in bugs):
            raise  # e.g. GeneratorExit: not ours to explain
        for bug in bugs:
            typer.echo(f"mcrelay: internal error: {type(bug).__name__}: {bug}", err=True)
        sys.exit(70)
