"""The ``mcrelay`` command: the daemon, the client commands, and the traffic tools.

Each command is synchronous and runs trio itself. Errors reach the user as one line on stderr
(one per error when several happened at once) and a non-zero exit code, never as a traceback.
The ``supervisor`` command is `mcrelay.daemon_command`; the client commands here talk to the
daemon through `mcrelay.client` alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mcrelay import __version__, client, config
from mcrelay import rules as rules_mod
from mcrelay.daemon_command import supervisor_command
from mcrelay.errors import McrelayError, leaves, split
from mcrelay.ipc import messages as m
from mcrelay.ipc import replies
from mcrelay.rule_diff import RuleDiff
from mcrelay.system import DEFAULT_CONTROL_SOCKET, LOG_LEVELS, check_log_level
from mcrelay.tools import gen_command, sink_command, top_command

app = typer.Typer(
    name="mcrelay",
    help="Relay multicast UDP across boundaries that kernel routing cannot cross.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command("gen")(gen_command)
app.command("sink")(sink_command)
app.command("top")(top_command)
app.command("supervisor")(supervisor_command)
config_app = typer.Typer(help="Show, check, load and save rule files (TOML).", no_args_is_help=True)
app.add_typer(config_app, name="config")


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


def _call(socket_path: Path, request: m.Request[R]) -> R:
    try:
        result = client.ask(socket_path, request)
    except McrelayError as exc:
        raise fail(str(exc)) from None
    warning = getattr(result, "warning", None)
    if warning:  # made, but the daemon has a caveat
        typer.echo(f"mcrelay: warning: {warning}", err=True)
    return result


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=False))


def _print_result(result: replies.Result) -> None:
    """A result as ``--json`` has always shown it (`replies.public`)."""
    _print_json(replies.public(result))


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# --- client commands --------------------------------------------------------------------------


@app.command()
def ping(socket: SocketOpt = DEFAULT_CONTROL_SOCKET) -> None:
    """Check that the daemon answers."""
    _call(socket, m.Ping())
    typer.echo("pong")


@app.command()
def workers(socket: SocketOpt = DEFAULT_CONTROL_SOCKET, as_json: JsonOpt = False) -> None:
    """List the worker processes and their states."""
    result = _call(socket, m.ListWorkers())
    if as_json:
        _print_result(result)
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
    _table(headers, rows)
    aside = next((w.state_moved_aside for w in result.workers if w.state_moved_aside), None)
    if aside:
        typer.echo(f"the saved rule table was unreadable at start and was moved aside to {aside}")


@app.command()
def add(
    input_interface: Annotated[str, typer.Option(help="Interface the traffic arrives on.")],
    input_group: Annotated[str, typer.Option(help="Destination group or address to capture.")],
    input_port: Annotated[int, typer.Option(help="Destination UDP port to capture.")],
    output: Annotated[
        list[str],
        typer.Option(help="ADDR:PORT:INTERFACE[:TTL] to republish to; repeat for fan-out."),
    ],
    input_source: Annotated[
        str | None, typer.Option(help="Relay only packets from this source address.")
    ] = None,
    input_vlan: Annotated[
        int | None,
        typer.Option(
            help="Relay only frames tagged with this VLAN id (1-4094) [default: untagged]."
        ),
    ] = None,
    rule_id: Annotated[
        str | None, typer.Option("--id", help="Rule id [default: hash of the input].")
    ] = None,
    socket: SocketOpt = DEFAULT_CONTROL_SOCKET,
) -> None:
    """Add a relay rule; prints its id."""
    try:
        rule = rules_mod.make_rule(
            interface=input_interface,
            group=input_group,
            port=input_port,
            source=input_source,
            vlan=input_vlan,
            rule_id=rule_id,
            outputs=[rules_mod.parse_output(o) for o in output],
        )
    except McrelayError as exc:
        raise fail(str(exc), 2) from None
    result = _call(socket, m.AddRule(rule=rule))
    typer.echo(result.id)


@app.command()
def remove(
    rule_id: Annotated[str, typer.Argument(metavar="ID", help="Id of the rule to remove.")],
    socket: SocketOpt = DEFAULT_CONTROL_SOCKET,
) -> None:
    """Remove a relay rule."""
    _call(socket, m.RemoveRule(id=rule_id))
    typer.echo(f"removed {rule_id}")


@app.command("rules")
def list_rules(socket: SocketOpt = DEFAULT_CONTROL_SOCKET, as_json: JsonOpt = False) -> None:
    """List the relay rules."""
    result = _call(socket, m.ListRules())
    if as_json:
        _print_result(result)
        return
    rows = []
    for r in result.rules:
        inp = r.input
        source = f" from {inp.source}" if inp.source else ""
        outs = ", ".join(str(o) for o in r.outputs)
        vlan = f" vlan {inp.vlan}" if inp.vlan is not None else ""
        where = f"{inp.group}:{inp.port} on {inp.interface}{vlan}{source}"
        rows.append([r.id, r.state, where, outs])
    _table(["ID", "STATE", "INPUT", "OUTPUTS"], rows)
    for r in result.rules:
        if r.reason:
            typer.echo(f"{r.id} is {r.state}: {r.reason}")


@app.command()
def stats(socket: SocketOpt = DEFAULT_CONTROL_SOCKET, as_json: JsonOpt = False) -> None:
    """Packet counters and rates per rule and output, merged over all workers."""
    result = _call(socket, m.GetStats())
    if as_json:
        _print_result(result)
        return
    rows: list[list[Any]] = []
    for r in result.rules:
        rows.append([r.id, "in", r.packets_in, r.bytes_in, "-", r.pps_in])
        for o in r.outputs:
            rows.append(["", o.output, o.packets, o.bytes, o.errors, o.pps])
    _table(["RULE", "DIRECTION", "PACKETS", "BYTES", "ERRORS", "PPS"], rows)
    drops = ", ".join(f"{k}={v}" for k, v in result.drops.items() if v) or "none"
    typer.echo(f"drops: {drops}; kernel drops: {result.kernel_drops}")


@app.command("log-level")
def log_level_cmd(
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
    result = _call(socket, m.LogLevel(level=level))
    typer.echo(result.level)


@app.command("restart-worker")
def restart_worker(
    worker_id: Annotated[str, typer.Argument(metavar="ID", help="Worker id, e.g. data-0.")],
    socket: SocketOpt = DEFAULT_CONTROL_SOCKET,
) -> None:
    """Restart a worker now, skipping any pending backoff."""
    _call(socket, m.RestartWorker(id=worker_id))
    typer.echo(f"restarting {worker_id}")


# --- config files -----------------------------------------------------------------------------


def _daemon_rules(socket_path: Path) -> tuple[rules_mod.Rule, ...]:
    """The daemon's rules as rule objects (without their live state)."""
    return tuple(info.rule for info in _call(socket_path, m.ListRules()).rules)


def _load_file(path: Path) -> tuple[rules_mod.Rule, ...]:
    try:
        return config.load(path)
    except McrelayError as exc:
        raise fail(str(exc), 2) from None


@config_app.command("show")
def config_show(socket: SocketOpt = DEFAULT_CONTROL_SOCKET) -> None:
    """Print the daemon's rules as a config file."""
    rules = _daemon_rules(socket)
    typer.echo(config.dump(rules), nl=False)


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="TOML rule file.")],
) -> None:
    """Validate a rule file without touching the daemon."""
    rules = _load_file(file)
    typer.echo(f"{file}: {len(rules)} rule(s), valid")


@config_app.command("load")
def config_load(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="TOML rule file.")],
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Show what would be added, removed and changed; change nothing."
        ),
    ] = False,
    socket: SocketOpt = DEFAULT_CONTROL_SOCKET,
    as_json: JsonOpt = False,
) -> None:
    """Make the daemon's rules equal to the file's; only the difference is applied."""
    rules = _load_file(file)
    result = _call(socket, m.ReplaceRules(rules=rules, dry_run=dry_run))
    diff = RuleDiff.from_reply(result.added, result.removed, len(rules))
    if as_json:
        _print_json(
            {
                "file": str(file),
                "rules": len(rules),
                "dry_run": dry_run,
                "added": list(diff.added),
                "removed": list(diff.removed),
                "changed": list(diff.changed),
                "unchanged": diff.unchanged,
            }
        )
        return
    if not dry_run:
        typer.echo(
            f"{file}: {len(rules)} rule(s); {len(diff.added) + len(diff.changed)} added or "
            f"changed, {len(diff.removed)} removed"
        )
        return
    typer.echo(
        f"{file}: {len(rules)} rule(s); dry run, nothing changed: would add {len(diff.added)}, "
        f"remove {len(diff.removed)}, change {len(diff.changed)}, leave {diff.unchanged}"
    )
    for verb, ids in (("add", diff.added), ("remove", diff.removed), ("change", diff.changed)):
        for rule_id in ids:
            typer.echo(f"  {verb:<7} {rule_id}")


@config_app.command("save")
def config_save(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Where to write the rule file.")],
    socket: SocketOpt = DEFAULT_CONTROL_SOCKET,
) -> None:
    """Write the daemon's rules to a config file."""
    rules = _daemon_rules(socket)
    try:
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(config.dump(rules), encoding="utf-8")
        tmp.replace(file)
    except OSError as exc:
        raise fail(f"cannot write {file}: {exc}") from None
    typer.echo(f"{file}: {len(rules)} rule(s) saved")


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
