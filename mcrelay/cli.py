"""The ``mcrelay`` command: the daemon, the client commands, and the traffic tools.

Each command is synchronous and runs trio itself. Errors reach the user as one line on stderr
and a non-zero exit code, never as a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mcrelay import __version__, client, config
from mcrelay import rules as rules_mod
from mcrelay.errors import McrelayError
from mcrelay.ipc import messages as m
from mcrelay.ipc import replies
from mcrelay.supervisor.persistence import DEFAULT_STATE_DIR
from mcrelay.supervisor.settings import DEFAULT_CONTROL_SOCKET
from mcrelay.system.logs import LOG_LEVELS
from mcrelay.system.privileges import DEFAULT_CONTROL_USER, DEFAULT_DATA_USER
from mcrelay.tools.commands import gen_command, sink_command
from mcrelay.tools.top import top_command

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


# --- the daemon -------------------------------------------------------------------------------


def _metrics_listen(value: str | None) -> str | None:
    from mcrelay.system.metrics import parse_listen

    if value is not None:
        try:
            parse_listen(value)
        except McrelayError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


@app.command()
def supervisor(
    control_socket: Annotated[
        Path, typer.Option(help="Where to create the control socket.")
    ] = DEFAULT_CONTROL_SOCKET,
    num_workers: Annotated[
        int | None, typer.Option(help="Data-plane workers [default: number of CPUs].", min=1)
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Rules from this TOML file: applied at start and on SIGHUP when it changed "
            "since the saved table was made from it (docs/configuration.md).",
        ),
    ] = None,
    keep_runtime_rules: Annotated[
        bool,
        typer.Option(
            help="When the --config file changed, keep the rules added at runtime (not from "
            "the file) on top of its rules [default: dropped, and logged]."
        ),
    ] = False,
    state_dir: Annotated[
        Path, typer.Option(help="Where the rule table is saved on every change and restored from.")
    ] = DEFAULT_STATE_DIR,
    log_level: Annotated[str, typer.Option(help=f"One of {', '.join(LOG_LEVELS)}.")] = "info",
    socket_group: Annotated[
        str | None,
        typer.Option(help="Group whose members may use the control socket [default: root only]."),
    ] = None,
    read_group: Annotated[
        str | None,
        typer.Option(
            help="Group whose members may only read: ping, workers, rules, stats, log level "
            "[default: none]."
        ),
    ] = None,
    allow_input_interface: Annotated[
        list[str] | None,
        typer.Option(
            metavar="IF",
            help="Rules may capture only on these interfaces (repeat) [default: any but lo].",
        ),
    ] = None,
    allow_output: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PREFIX[:PORTS][%IF]",
            help="Outputs may only go to these destinations (repeat), e.g. 239.0.0.0/8, "
            "10.1.0.0/16:6000-6099%eth2 [default: anywhere but loopback].",
        ),
    ] = None,
    allow_host_input: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PREFIX[:PORTS][%IF]",
            help="Rules may capture these addresses of this host (repeat; 0.0.0.0/0: all) "
            "[default: none].",
        ),
    ] = None,
    allow_loopback: Annotated[
        bool,
        typer.Option(help="Allow lo and 127.0.0.0/8 as inputs and outputs [default: refused]."),
    ] = False,
    user: Annotated[
        str,
        typer.Option(
            help="User the data workers run as (when started as root; a missing default user "
            "is replaced by an unused uid)."
        ),
    ] = DEFAULT_DATA_USER,
    control_user: Annotated[
        str,
        typer.Option(
            help="User the control worker runs as (when started as root; a missing default "
            "user is replaced by an unused uid)."
        ),
    ] = DEFAULT_CONTROL_USER,
    unsafe_keep_worker_root: Annotated[
        bool,
        typer.Option(
            help="UNSAFE: start even if workers cannot switch away from root's uid (they still "
            "lose every capability, but a worker bug then owns root's files)."
        ),
    ] = False,
    pin_workers: Annotated[
        bool,
        typer.Option(help="Pin data worker i to CPU i (distinct CPUs while enough)."),
    ] = False,
    exit_on_fatal: Annotated[
        bool, typer.Option(help="Exit non-zero when a worker exceeds its restart intensity.")
    ] = False,
    backoff_initial: Annotated[
        float, typer.Option(help="First restart delay, seconds.", min=0.001)
    ] = 0.25,
    backoff_max: Annotated[
        float, typer.Option(help="Restart delay cap, seconds.", min=0.001)
    ] = 16.0,
    stable_after: Annotated[
        float, typer.Option(help="Run time after which the restart delay resets, seconds.", min=0)
    ] = 30.0,
    heartbeat_timeout: Annotated[
        float, typer.Option(help="A worker silent this long is killed, seconds.", min=0.1)
    ] = 3.0,
    max_failures: Annotated[
        int, typer.Option(help="More failures than this within --failure-window: fatal.", min=1)
    ] = 10,
    failure_window: Annotated[
        float, typer.Option(help="Window for --max-failures, seconds.", min=1)
    ] = 60.0,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            metavar="ADDR:PORT",
            callback=_metrics_listen,
            help="Serve Prometheus metrics at http://ADDR:PORT/metrics [default: off].",
        ),
    ] = None,
) -> None:
    """Run the daemon in the foreground (systemd does the daemonizing)."""
    import trio

    from mcrelay.policy import AccessPolicy
    from mcrelay.supervisor.backoff import BackoffPolicy
    from mcrelay.supervisor.dataplane import KernelDataPlane
    from mcrelay.supervisor.launcher import SpawnerLauncher, WorkerUsers
    from mcrelay.supervisor.main import run_daemon
    from mcrelay.supervisor.persistence import RuleStore
    from mcrelay.supervisor.settings import SupervisorSettings
    from mcrelay.system.logs import setup_logging
    from mcrelay.system.process import raise_open_file_limit

    if log_level not in LOG_LEVELS:
        raise typer.BadParameter(f"use one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
    if backoff_max < backoff_initial:
        raise typer.BadParameter("must be at least --backoff-initial", param_hint="--backoff-max")
    setup_logging(log_level, "mcrelay: supervisor")
    socket_gid = _group_id(socket_group, "--socket-group")
    read_gid = _group_id(read_group, "--read-group")
    try:
        initial = config.load(config_file) if config_file else ()
        policy = AccessPolicy.from_options(
            input_interfaces=allow_input_interface or (),
            outputs=allow_output or (),
            host_inputs=allow_host_input or (),
            allow_loopback=allow_loopback,
        )
    except McrelayError as exc:
        raise fail(str(exc), 2) from None
    settings = SupervisorSettings(
        control_socket=control_socket,
        num_workers=num_workers or os.cpu_count() or 1,
        backoff=BackoffPolicy(backoff_initial, backoff_max, stable_after),
        max_failures=max_failures,
        failure_window=failure_window,
        exit_on_fatal=exit_on_fatal,
        pin_workers=pin_workers,
        keep_runtime_rules=keep_runtime_rules,
        worker_user=user,
        control_user=control_user,
        unsafe_keep_worker_root=unsafe_keep_worker_root,
        socket_gid=socket_gid,
        read_gid=read_gid,
        policy=policy,
        heartbeat_timeout=heartbeat_timeout,
        heartbeat_interval=min(1.0, heartbeat_timeout / 3),
        log_level=log_level,
    )
    launcher: SpawnerLauncher | None = None
    try:
        # Before the spawner: it and every worker inherit the raised open-file limit.
        raise_open_file_limit()
        # Before the trio loop: the spawner is the only process that forks workers.
        users = WorkerUsers.resolve(user, control_user, keep_root=unsafe_keep_worker_root)
        launcher = SpawnerLauncher(users)
        launcher.start()
        code = trio.run(
            partial(
                run_daemon,
                settings,
                launcher,
                initial_rules=initial,
                dataplane=KernelDataPlane(),
                config_file=config_file,
                store=RuleStore(state_dir),
                metrics_listen=metrics_listen,
            )
        )
    except (McrelayError, OSError, ExceptionGroup) as exc:
        message = _start_refusal(exc)
        if message is None:
            raise
        raise fail(message, 2) from None
    finally:
        if launcher is not None:
            launcher.close()
    raise typer.Exit(code)


def _start_refusal(exc: BaseException) -> str | None:
    """The sentence for a daemon that cannot start, or None for anything else (a bug). A refusal
    raised inside the daemon's task tree arrives in an exception group: every part is said."""
    if isinstance(exc, McrelayError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"cannot start: {exc}"
    if isinstance(exc, BaseExceptionGroup):
        parts = [_start_refusal(e) for e in exc.exceptions]
        if parts and all(parts):
            return "; ".join(p for p in parts if p)
    return None


def _group_id(name: str | None, option: str) -> int | None:
    if name is None:
        return None
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise fail(f"{option} {name}: no such group", 2) from None


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
    if level is not None and level not in LOG_LEVELS:
        raise fail(f"unknown log level {level!r} (use {', '.join(LOG_LEVELS)})", 2)
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
    from mcrelay.supervisor.precedence import RuleDiff

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
    """Console entry point: nothing but a one-line message escapes to the user."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # last resort: a bug must still not print a traceback
        while isinstance(exc, ExceptionGroup):
            exc = exc.exceptions[0]
        typer.echo(f"mcrelay: internal error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(70)
