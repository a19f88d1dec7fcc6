"""Typer commands for `mcrelay gen` and `mcrelay sink`; the main app registers them.

Bad input is a `typer.BadParameter` (usage error, exit 2). A tool that cannot run (unknown
interface at join time, socket error) prints one line to stderr and exits 1. A run that
happened exits 0 even with loss: the report is where loss is read.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Annotated

import typer

from mcrelay.cli.traffic import payload
from mcrelay.cli.traffic.gen import run_gen
from mcrelay.cli.traffic.net import ToolError
from mcrelay.cli.traffic.sink import run_sink


def _ipv4(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an IPv4 address") from None


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise typer.BadParameter(f"{value} is outside 1-65535")
    return value


def _size(value: int | None) -> int | None:
    if value is None:
        return None
    try:
        return payload.check_size(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _interface(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        socket.if_nametoindex(value)
    except OSError:
        raise typer.BadParameter(f"no such network interface: {value!r}") from None
    return value


def _not_negative(value: float | None) -> float | None:
    if value is not None and value < 0:
        raise typer.BadParameter(f"{value} is negative")
    return value


def _positive(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value} is not positive")
    return value


def _ttl(value: int) -> int:
    if not 0 <= value <= 255:
        raise typer.BadParameter(f"{value} is outside 0-255")
    return value


def _fail(tool: str, exc: Exception) -> typer.Exit:
    typer.echo(f"mcrelay {tool}: error: {exc}", err=True)
    return typer.Exit(code=1)


def gen_command(
    group: Annotated[
        str, typer.Option(help="Destination group (or unicast address).", callback=_ipv4)
    ],
    port: Annotated[int, typer.Option(help="Destination UDP port.", callback=_port)],
    interface: Annotated[
        str | None,
        typer.Option(help="Send out of this interface (not with --source).", callback=_interface),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(help="Bind this source address; picks the egress.", callback=_ipv4),
    ] = None,
    rate: Annotated[
        float,
        typer.Option(help="Datagrams per second; 0 = as fast as possible.", callback=_not_negative),
    ] = 1000.0,
    count: Annotated[int, typer.Option(help="Datagrams to send.", callback=_not_negative)] = 1000,
    size: Annotated[
        int,
        typer.Option(
            help=f"UDP payload bytes ({payload.HEADER_SIZE}-{payload.MAX_SIZE}).", callback=_size
        ),
    ] = 1024,
    ttl: Annotated[int, typer.Option(help="IP TTL of the datagrams.", callback=_ttl)] = 8,
    stream: Annotated[
        int,
        typer.Option(
            help="Stream id; give concurrent generators different ones.", min=0, max=2**32 - 1
        ),
    ] = 0,
) -> None:
    """Send numbered test datagrams at a steady rate."""
    if interface is not None and source is not None:
        raise typer.BadParameter(
            "use either --interface or --source, not both", param_hint="'--interface' / '--source'"
        )
    try:
        report = run_gen(
            group,
            port,
            interface=interface,
            source=source,
            rate=rate,
            count=count,
            size=size,
            ttl=ttl,
            stream=stream,
            progress=sys.stderr.isatty(),
        )
    except ToolError as exc:
        raise _fail("gen", exc) from None
    typer.echo(report.summary())
    if report.interrupted:
        raise typer.Exit(code=130)


def sink_command(
    group: Annotated[
        str, typer.Option(help="Group to join (or local unicast address to bind).", callback=_ipv4)
    ],
    port: Annotated[int, typer.Option(help="UDP port.", callback=_port)],
    interface: Annotated[
        str | None,
        typer.Option(help="Join on this interface (required for a group).", callback=_interface),
    ] = None,
    count: Annotated[
        int | None, typer.Option(help="Stop after this many datagrams.", callback=_positive)
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds.", callback=_positive)
    ] = None,
    idle_timeout: Annotated[
        float,
        typer.Option(
            help="Stop after this many seconds without a datagram; 0 = never.",
            callback=_not_negative,
        ),
    ] = 2.0,
    expect_size: Annotated[
        int | None,
        typer.Option(help="Count datagrams of any other size as corrupted.", callback=_size),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object.")
    ] = False,
) -> None:
    """Receive test datagrams and report loss, duplicates, order, integrity and latency."""
    if interface is None and ipaddress.IPv4Address(group).is_multicast:
        raise typer.BadParameter(
            f"required to join the multicast group {group}", param_hint="'--interface'"
        )

    def ready() -> None:
        where = f" on {interface}" if interface else ""
        typer.echo(f"ready {group}:{port}{where}", err=True)

    try:
        report = run_sink(
            group,
            port,
            interface=interface,
            count=count,
            duration=duration,
            idle_timeout=idle_timeout,
            expect_size=expect_size,
            on_ready=ready,
        )
    except ToolError as exc:
        raise _fail("sink", exc) from None
    typer.echo(report.to_json() if json_output else report.summary())
