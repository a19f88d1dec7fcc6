"""Client commands that change or show the rule table: ``add``, ``remove``, ``rules``, and the
``config`` group that moves whole rule files (TOML) between disk and the daemon.

A rule or file that is wrong is refused here, before the daemon is asked (exit 2); the daemon's
own refusals come back through `mcrelay.cli.common.call` (exit 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mcrelay import config
from mcrelay import rules as rules_mod
from mcrelay.cli.common import JsonOpt, SocketOpt, call, fail, print_json, print_result, table
from mcrelay.errors import McrelayError
from mcrelay.ipc import messages as m
from mcrelay.rule_diff import RuleDiff
from mcrelay.system import DEFAULT_CONTROL_SOCKET

config_app = typer.Typer(help="Show, check, load and save rule files (TOML).", no_args_is_help=True)


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
    result = call(socket, m.AddRule(rule=rule))
    typer.echo(result.id)


def remove(
    rule_id: Annotated[str, typer.Argument(metavar="ID", help="Id of the rule to remove.")],
    socket: SocketOpt = DEFAULT_CONTROL_SOCKET,
) -> None:
    """Remove a relay rule."""
    call(socket, m.RemoveRule(id=rule_id))
    typer.echo(f"removed {rule_id}")


def list_rules(socket: SocketOpt = DEFAULT_CONTROL_SOCKET, as_json: JsonOpt = False) -> None:
    """List the relay rules."""
    result = call(socket, m.ListRules())
    if as_json:
        print_result(result)
        return
    rows = []
    for r in result.rules:
        inp = r.input
        source = f" from {inp.source}" if inp.source else ""
        outs = ", ".join(str(o) for o in r.outputs)
        vlan = f" vlan {inp.vlan}" if inp.vlan is not None else ""
        where = f"{inp.group}:{inp.port} on {inp.interface}{vlan}{source}"
        rows.append([r.id, r.state, where, outs])
    table(["ID", "STATE", "INPUT", "OUTPUTS"], rows)
    for r in result.rules:
        if r.reason:
            typer.echo(f"{r.id} is {r.state}: {r.reason}")


# --- config files -----------------------------------------------------------------------------


def _daemon_rules(socket_path: Path) -> tuple[rules_mod.Rule, ...]:
    """The daemon's rules as rule objects (without their live state)."""
    return tuple(info.rule for info in call(socket_path, m.ListRules()).rules)


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
    result = call(socket, m.ReplaceRules(rules=rules, dry_run=dry_run))
    diff = RuleDiff.from_reply(result.added, result.removed, len(rules))
    if as_json:
        print_json(
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
