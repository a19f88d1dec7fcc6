"""`mcrelay top`: a live view of the workers, the rules' traffic and the drops.

It polls the daemon (ListWorkers, GetStats, ListRules) every ``--interval`` seconds and redraws
in place. A daemon that is down or does not answer is shown as such, with the last data seen, and
polled again on the next tick. Ctrl-C (or SIGTERM) exits with status 0. ``--once`` prints one
frame and exits (1, with the usual one-line error, when the daemon cannot be reached).

`render_frame` is pure: it builds the frame from snapshots, and the tests print it to a recording
console.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import trio
import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mcrelay import client
from mcrelay.errors import McrelayError
from mcrelay.ipc import messages as m
from mcrelay.ipc.replies import RuleInfo, RuleState, Stats, WorkerInfo, WorkerState
from mcrelay.system.paths import DEFAULT_CONTROL_SOCKET

#: A poll that takes longer counts as the daemon not answering (then retried next tick).
POLL_TIMEOUT = 5.0
#: `--once` waits as long as the other client commands.
ONCE_TIMEOUT = 20.0

WORKER_STYLES: dict[str, str] = {
    WorkerState.RUNNING: "green",
    WorkerState.STARTING: "cyan",
    WorkerState.BACKOFF: "yellow",
    WorkerState.STOPPING: "magenta",
    WorkerState.EXITED: "dim",
    WorkerState.FATAL: "bold red",
}
RULE_STYLES: dict[str, str] = {
    RuleState.ACTIVE: "green",
    RuleState.PAUSED: "yellow",
    RuleState.UNRESOLVED: "red",
    RuleState.REFUSED: "magenta",
    RuleState.FAILED: "red",
}


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One poll's answers, as the daemon returned them."""

    workers: list[WorkerInfo]
    stats: Stats
    rules: list[RuleInfo]
    #: Wall-clock time (``time.time()``) the poll finished.
    at: float


@dataclasses.dataclass(frozen=True)
class View:
    """Everything one frame shows."""

    socket: Path
    interval: float
    now: float
    #: The latest successful poll, if any.
    current: Snapshot | None = None
    #: The one before it: error counters that grew since are highlighted.
    previous: Snapshot | None = None
    #: Why the latest poll failed (None: it succeeded).
    error: str | None = None
    #: When the polls started failing.
    down_since: float | None = None


async def fetch(socket: Path) -> Snapshot:
    """Poll the daemon once; the caller owns the timeout."""
    workers = await client.request(socket, m.ListWorkers())
    stats = await client.request(socket, m.GetStats())
    rules = await client.request(socket, m.ListRules())
    return Snapshot(workers.workers, stats, rules.rules, time.time())


# --- rendering (pure) -----------------------------------------------------------------------


def format_pps(pps: float) -> str:
    return f"{pps:.1f}" if pps < 10 else f"{pps:,.0f}"


def format_bits(bps: float) -> str:
    """Bits per second with an SI prefix: ``0 bit/s``, ``12.3 kbit/s``, ``1.50 Gbit/s``."""
    if bps < 1000:
        return f"{bps:.0f} bit/s"
    exponent = min(int(math.log10(bps) // 3), 4)
    value = bps / 1000**exponent
    unit = ("", "k", "M", "G", "T")[exponent]
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{value:.{digits}f} {unit}bit/s"


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def workers_table(workers: Sequence[WorkerInfo]) -> Table:
    table = Table(title="workers", title_justify="left", expand=False, box=None, pad_edge=False)
    for name, justify in (
        ("ID", "left"),
        ("KIND", "left"),
        ("PID", "right"),
        ("STATE", "left"),
        ("RESTARTS", "right"),
        ("RULES", "right"),
        ("BACKOFF", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for w in workers:
        backoff = w.backoff_remaining_s
        table.add_row(
            w.id,
            w.kind,
            _cell(w.pid),
            Text(w.state, style=WORKER_STYLES.get(w.state, "")),
            Text(str(w.restarts), style="yellow" if w.restarts else ""),
            _cell(w.rules),
            "-" if backoff is None else f"{backoff:.2f}s",
        )
    return table


def _errors_before(previous: Snapshot | None) -> dict[tuple[str, str], int]:
    if previous is None:
        return {}
    return {(r.id, o.output): o.errors for r in previous.stats.rules for o in r.outputs}


def rules_table(snapshot: Snapshot, previous: Snapshot | None = None) -> Table:
    table = Table(title="rules", title_justify="left", expand=False, box=None, pad_edge=False)
    for name, justify in (
        ("RULE", "left"),
        ("STATE", "left"),
        ("IN PPS", "right"),
        ("IN RATE", "right"),
        ("OUTPUT", "left"),
        ("OUT PPS", "right"),
        ("OUT RATE", "right"),
        ("ERRORS", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    stats = {r.id: r for r in snapshot.stats.rules}
    states = {r.id: r.state for r in snapshot.rules}
    defined = {r.id: r for r in snapshot.rules}
    before = _errors_before(previous)
    for rule_id in [*defined, *(i for i in stats if i not in defined)]:
        state = states.get(rule_id, "?")
        rule_cells: list[RenderableType] = [
            rule_id,
            Text(state, style=RULE_STYLES.get(state, "")),
        ]
        s = stats.get(rule_id)
        if s is None:  # added between the two requests: no counters yet
            rule_cells += ["-", "-"]
            outputs: list[list[RenderableType]] = [
                [str(o), "-", "-", "-"] for o in defined[rule_id].outputs
            ]
        else:
            rule_cells += [format_pps(s.pps_in), format_bits(s.bps_in)]
            outputs = []
            for o in s.outputs:
                errors = o.errors
                grew = errors - before.get((rule_id, o.output), errors)
                if grew > 0:
                    shown = Text(f"{errors} (+{grew})", style="bold red")
                else:
                    shown = Text(str(errors), style="red" if errors else "dim")
                outputs.append([o.output, format_pps(o.pps), format_bits(o.bps), shown])
        if not outputs:
            outputs = [["-", "-", "-", "-"]]
        table.add_row(*rule_cells, *outputs[0])
        for row in outputs[1:]:
            table.add_row("", "", "", "", *row)
    return table


def drops_line(stats: Stats) -> Text:
    drops = {k: v for k, v in stats.drops.items() if v}
    line = Text("drops: ")
    if drops:
        line.append(" ".join(f"{k}={v}" for k, v in drops.items()), style="yellow")
    else:
        line.append("none", style="dim")
    kernel = stats.kernel_drops
    line.append("   kernel drops: ")
    line.append(str(kernel), style="red" if kernel else "dim")
    return line


def summary_line(snapshot: Snapshot) -> Text:
    running = sum(1 for w in snapshot.workers if w.state == WorkerState.RUNNING)
    line = Text(f"workers {running}/{len(snapshot.workers)} running", style="bold")
    counts: dict[str, int] = {}
    for r in snapshot.rules:
        counts[r.state] = counts.get(r.state, 0) + 1
    detail = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    line.append(f"   rules {len(snapshot.rules)}" + (f" ({detail})" if detail else ""))
    stat_rules = snapshot.stats.rules
    pps = sum(r.pps_in for r in stat_rules)
    bps = sum(r.bps_in for r in stat_rules)
    line.append(f"   in {format_pps(pps)} pps {format_bits(bps)}")
    return line


def render_frame(view: View) -> RenderableType:
    """The whole frame: header, daemon status, summary, workers, rules, drops."""
    header = Text(f"mcrelay top  {view.socket}  {_clock(view.now)}", style="bold")
    header.append(f"   every {view.interval:g} s, Ctrl-C to quit", style="dim")
    parts: list[RenderableType] = [header]
    if view.error is not None:
        since = _clock(view.down_since if view.down_since is not None else view.now)
        parts.append(
            Text(
                f"daemon unreachable since {since}: {view.error}; retrying every "
                f"{view.interval:g} s",
                style="bold red",
            )
        )
    snapshot = view.current
    if snapshot is None:
        if view.error is None:
            parts.append(Text("waiting for the daemon…", style="dim"))
        return Group(*parts)
    if view.error is not None:
        parts.append(Text(f"last data from {_clock(snapshot.at)}:", style="dim"))
    parts += [
        summary_line(snapshot),
        Text(""),
        workers_table(snapshot.workers),
        Text(""),
        rules_table(snapshot, view.previous)
        if snapshot.rules or snapshot.stats.rules
        else Text("rules: none", style="dim"),
        Text(""),
        drops_line(snapshot.stats),
    ]
    return Group(*parts)


# --- the loop -------------------------------------------------------------------------------


def _os_error(socket: Path, exc: OSError) -> str:
    return f"cannot reach the daemon on {socket}: {exc.strerror or exc}"


class _Poller:
    """Keeps the latest snapshots and the failure state between ticks."""

    def __init__(self, socket: Path, interval: float) -> None:
        self.view = View(socket=socket, interval=interval, now=time.time())

    async def poll(self, fetcher: Callable[[Path], Awaitable[Snapshot]]) -> View:
        v = self.view
        error: str | None = None
        snapshot: Snapshot | None = None
        with trio.move_on_after(POLL_TIMEOUT) as scope:
            try:
                snapshot = await fetcher(v.socket)
            except McrelayError as exc:
                error = str(exc)
            except OSError as exc:  # not a socket, reset…: still worth retrying
                error = _os_error(v.socket, exc)
        if scope.cancelled_caught:
            error = f"the daemon on {v.socket} did not answer within {POLL_TIMEOUT:g} s"
        now = time.time()
        if snapshot is not None:
            self.view = View(v.socket, v.interval, now, snapshot, v.current)
        else:
            since = v.down_since if v.error is not None else now
            self.view = dataclasses.replace(v, now=now, error=error, down_since=since)
        return self.view


async def run_top(
    socket: Path,
    interval: float,
    console: Console,
    *,
    fetcher: Callable[[Path], Awaitable[Snapshot]] = fetch,
) -> None:
    """Redraw every ``interval`` until cancelled, SIGINT or SIGTERM.

    On a terminal the frame is redrawn in place (alternate screen, restored on exit); otherwise
    each frame is printed after the previous one, like ``top -b``.
    """
    poller = _Poller(socket, interval)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        if console.is_terminal:
            with Live(
                render_frame(poller.view),
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
                vertical_overflow="crop",
            ) as live:
                await _tick(interval, poller, fetcher, partial(live.update, refresh=True))
        else:
            await _tick(interval, poller, fetcher, partial(_print_frame, console))


def _print_frame(console: Console, frame: RenderableType) -> None:
    console.print(frame)
    console.print()


async def _tick(
    interval: float,
    poller: _Poller,
    fetcher: Callable[[Path], Awaitable[Snapshot]],
    show: Callable[[RenderableType], None],
) -> None:
    deadline = trio.current_time()
    while True:
        show(render_frame(await poller.poll(fetcher)))
        deadline += interval
        now = trio.current_time()
        if deadline < now:  # a slow poll: skip the missed ticks instead of bursting
            deadline = now
        await trio.sleep_until(deadline)


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


# --- the command ----------------------------------------------------------------------------


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120  # a pipe or a file: wide enough for the tables, not 80
    return console


def top_command(
    socket: Annotated[
        Path,
        typer.Option(
            "--socket",
            envvar="MCRELAY_SOCKET",
            help="Control socket of the daemon.",
            show_default=True,
        ),
    ] = DEFAULT_CONTROL_SOCKET,
    interval: Annotated[
        float, typer.Option(help="Seconds between refreshes.", min=0.1, max=3600)
    ] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
) -> None:
    """Live view of the workers, the rules' traffic and the drops (Ctrl-C quits)."""
    console = _console()
    if once:

        async def _once() -> Snapshot:
            with trio.fail_after(ONCE_TIMEOUT):
                return await fetch(socket)

        try:
            snapshot = trio.run(_once)
        except trio.TooSlowError:
            typer.echo(
                f"mcrelay: the daemon on {socket} did not answer within {ONCE_TIMEOUT:.0f} s",
                err=True,
            )
            raise typer.Exit(1) from None
        except (McrelayError, OSError) as exc:
            message = _os_error(socket, exc) if isinstance(exc, OSError) else str(exc)
            typer.echo(f"mcrelay: {message}", err=True)
            raise typer.Exit(1) from None
        console.print(render_frame(View(socket, interval, snapshot.at, snapshot)))
        return
    try:
        trio.run(partial(run_top, socket, interval, console))
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was in place
        pass
    except BaseExceptionGroup as group:
        _, rest = group.split(KeyboardInterrupt)
        if rest is not None:
            raise
    raise typer.Exit(0)
