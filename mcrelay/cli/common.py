"""What every client command shares: the ``--socket`` and ``--json`` options, one request to the
daemon, and the three ways a result is printed (JSON, a table, a one-line error).

Only the client library, the messages and the reply types are imported here: a client command
never needs the supervisor's modules to talk to the daemon.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mcrelay import client
from mcrelay.errors import McrelayError
from mcrelay.ipc import messages as m
from mcrelay.ipc import replies

SocketOpt = Annotated[
    Path,
    typer.Option(
        "--socket",
        envvar="MCRELAY_SOCKET",
        help="Control socket of the daemon.",
        readable=False,  # connecting is what counts; the daemon explains a refusal
        show_default=True,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``mcrelay: MESSAGE`` on stderr; the exit to raise (1: a request or a write failed,
    2: the command line or a file is wrong)."""
    typer.echo(f"mcrelay: {message}", err=True)
    return typer.Exit(code=code)


R = TypeVar("R", bound=replies.Result)


def call(socket_path: Path, request: m.Request[R]) -> R:
    """The daemon's typed answer to ``request``; a refusal or an unreachable daemon is the
    one-line error and exit 1, and a caveat the daemon attached is printed as a warning."""
    try:
        result = client.ask(socket_path, request)
    except McrelayError as exc:
        raise fail(str(exc)) from None
    warning = getattr(result, "warning", None)
    if warning:  # made, but the daemon has a caveat
        typer.echo(f"mcrelay: warning: {warning}", err=True)
    return result


def print_json(value: Any) -> None:
    """``value`` as indented JSON, keys in the order they were built."""
    typer.echo(json.dumps(value, indent=2, sort_keys=False))


def print_result(result: replies.Result) -> None:
    """A result as ``--json`` has always shown it (`replies.public`)."""
    print_json(replies.public(result))


def table(headers: list[str], rows: list[list[Any]]) -> None:
    """Left-aligned columns as wide as their widest cell; a missing value is ``-``."""
    cells = [headers] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
