"""Client commands that look at or nudge the running daemon: ``ping``, ``workers``, ``stats``,
``log-level`` and ``restart-worker``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mcrelay.cli.common import JsonOpt, SocketOpt, call, fail, print_result, table
from mcrelay.errors import McrelayError
from mcrelay.ipc import messages as m
from mcrelay.system import DEFAULT_CONTROL_SOCKET, LOG_LEVELS, check_log_level


def ping(socket: SocketOpt = DEFAULT_CONTROL_SOCKET) -> None:
    """Check that the daemon answers."""
    call(socket, m.Ping())
    typer.echo("pong")


def workers(socket: SocketOpt = DEFAULT_CONTROL_SOCKET, as_json: JsonOpt = False) -> None:
    """List the worker processes and their states."""
    result = call(socket, m.ListWorkers())
    if as_json:
        print_result(result)
        return
    headers = ["ID", "KIND", "PID", "STATE", "RESTARTS", "RULES", "BACKOFF", "FAILED"]
    rows = [
        [
            w.id,
            w.kind,
            w.pid,
            w.state,
            w.restarts,
            w.rules,
            None if w.backoff_remaining_s is None else f"{w.backoff_remaining_s:.2f}s",
            w.failed_rules,
        ]
        for w in result.workers
    ]
    table(headers, rows)
    aside = next((w.state_moved_aside for w in result.workers if w.state_moved_aside), None)
    if aside:
        typer.echo(f"the saved rule table was unreadable at start and was moved aside to {aside}")


def stats(socket: SocketOpt = DEFAULT_CONTROL_SOCKET, as_json: JsonOpt = False) -> None:
    """Packet counters and rates per rule and output, merged over all workers."""
    result = call(socket, m.GetStats())
    if as_json:
        print_result(result)
        return
    rows: list[list[Any]] = []
    for r in result.rules:
        rows.append([r.id, "in", r.packets_in, r.bytes_in, "-", r.pps_in])
        for o in r.outputs:
            rows.append(["", o.output, o.packets, o.bytes, o.errors, o.pps])
    table(["RULE", "DIRECTION", "PACKETS", "BYTES", "ERRORS", "PPS"], rows)
    drops = ", ".join(f"{k}={v}" for k, v in result.drops.items() if v) or "none"
    typer.echo(f"drops: {drops}; kernel drops: {result.kernel_drops}")


def log_level(
    level: Annotated[
        str | None, typer.Argument(help=f"New level: {', '.join(LOG_LEVELS)}; omit to show.")
    ] = None,
    socket: SocketOpt = DEFAULT_CONTROL_SOCKET,
) -> None:
    """Show or change the log level of every mcrelay process."""
    if level is not None:
        try:
            check_log_level(level)
        except McrelayError as exc:
            raise fail(str(exc), 2) from None
    result = call(socket, m.LogLevel(level=level))
    typer.echo(result.level)


def restart_worker(
    worker_id: Annotated[str, typer.Argument(metavar="ID", help="Worker id, e.g. data-0.")],
    socket: SocketOpt = DEFAULT_CONTROL_SOCKET,
) -> None:
    """Restart a worker now, skipping any pending backoff."""
    call(socket, m.RestartWorker(id=worker_id))
    typer.echo(f"restarting {worker_id}")
