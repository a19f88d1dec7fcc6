"""``mcrelay supervisor``: the daemon's command line, which only parses.

Each option becomes a field of :class:`DaemonOptions`, whose defaults (shown by ``--help``) and
lower limits belong to the supervisor package; `mcrelay.supervisor.start.run` checks them and
runs the daemon. A bad option is a usage error and a refusal to start one line on stderr, both
exit code 2 (docs/reference.md lists the exit codes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mcrelay.errors import McrelayError
from mcrelay.supervisor import DEFAULTS as DAEMON
from mcrelay.supervisor import MAXIMUM, MINIMUM, BadOption, DaemonOptions
from mcrelay.system import LOG_LEVELS


def supervisor_command(
    control_socket: Annotated[
        Path, typer.Option(help="Where to create the control socket.")
    ] = DAEMON.control_socket,
    num_workers: Annotated[
        int | None,
        typer.Option(
            help="Data-plane workers [default: number of CPUs].", min=MINIMUM["num_workers"]
        ),
    ] = DAEMON.num_workers,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Rules from this TOML file: applied at start and on SIGHUP when it changed "
            "since the saved table was made from it (docs/configuration.md).",
        ),
    ] = DAEMON.config_file,
    keep_runtime_rules: Annotated[
        bool,
        typer.Option(
            help="When the --config file changed, keep the rules added at runtime (not from "
            "the file) on top of its rules [default: dropped, and logged]."
        ),
    ] = DAEMON.keep_runtime_rules,
    state_dir: Annotated[
        Path, typer.Option(help="Where the rule table is saved on every change and restored from.")
    ] = DAEMON.state_dir,
    log_level: Annotated[
        str, typer.Option(help=f"One of {', '.join(LOG_LEVELS)}.")
    ] = DAEMON.log_level,
    socket_group: Annotated[
        str | None,
        typer.Option(help="Group whose members may use the control socket [default: root only]."),
    ] = DAEMON.socket_group,
    read_group: Annotated[
        str | None,
        typer.Option(
            help="Group whose members may only read: ping, workers, rules, stats, log level "
            "[default: none]."
        ),
    ] = DAEMON.read_group,
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
    ] = DAEMON.allow_loopback,
    user: Annotated[
        str,
        typer.Option(
            help="User the data workers run as (when started as root; a missing default user "
            "is replaced by an unused uid)."
        ),
    ] = DAEMON.user,
    control_user: Annotated[
        str,
        typer.Option(
            help="User the control worker runs as (when started as root; a missing default "
            "user is replaced by an unused uid)."
        ),
    ] = DAEMON.control_user,
    unsafe_keep_worker_root: Annotated[
        bool,
        typer.Option(
            help="UNSAFE: start even if workers cannot switch away from root's uid (they still "
            "lose every capability, but a worker bug then owns root's files)."
        ),
    ] = DAEMON.unsafe_keep_worker_root,
    pin_workers: Annotated[
        bool,
        typer.Option(help="Pin data worker i to CPU i (distinct CPUs while enough)."),
    ] = DAEMON.pin_workers,
    capture_ring_mib: Annotated[
        int,
        typer.Option(
            help="Each capture socket's ring, MiB: it holds the traffic while a data worker is "
            "replaced (64 MiB: about 1 s, or 58,000 datagrams of 1 KiB).",
            min=MINIMUM["capture_ring_mib"],
            max=MAXIMUM["capture_ring_mib"],
        ),
    ] = DAEMON.capture_ring_mib,
    exit_on_fatal: Annotated[
        bool, typer.Option(help="Exit non-zero when a worker exceeds its restart intensity.")
    ] = DAEMON.exit_on_fatal,
    backoff_initial: Annotated[
        float,
        typer.Option(
            help="Restart delay after a second consecutive failure (the first is restarted at "
            "once), doubling up to --backoff-max; seconds.",
            min=MINIMUM["backoff_initial"],
        ),
    ] = DAEMON.backoff_initial,
    backoff_max: Annotated[
        float, typer.Option(help="Restart delay cap, seconds.", min=MINIMUM["backoff_max"])
    ] = DAEMON.backoff_max,
    stable_after: Annotated[
        float,
        typer.Option(
            help="A worker that ran this long before failing is restarted at once, and its "
            "failure ends any crash loop; seconds.",
            min=MINIMUM["stable_after"],
        ),
    ] = DAEMON.stable_after,
    heartbeat_timeout: Annotated[
        float,
        typer.Option(
            help="The control worker silent this long is killed, seconds.",
            min=MINIMUM["heartbeat_timeout"],
        ),
    ] = DAEMON.heartbeat_timeout,
    data_heartbeat_timeout: Annotated[
        float,
        typer.Option(
            help="A data worker silent this long is killed and replaced (its rings keep its "
            "traffic meanwhile), seconds.",
            min=MINIMUM["data_heartbeat_timeout"],
        ),
    ] = DAEMON.data_heartbeat_timeout,
    max_failures: Annotated[
        int,
        typer.Option(
            help="More failures than this within --failure-window: fatal.",
            min=MINIMUM["max_failures"],
        ),
    ] = DAEMON.max_failures,
    failure_window: Annotated[
        float,
        typer.Option(help="Window for --max-failures, seconds.", min=MINIMUM["failure_window"]),
    ] = DAEMON.failure_window,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            metavar="ADDR:PORT",
            help="Serve Prometheus metrics at http://ADDR:PORT/metrics [default: off].",
        ),
    ] = DAEMON.metrics_listen,
) -> None:
    """Run the daemon in the foreground (systemd does the daemonizing)."""
    # Imported here: the daemon's modules are many, and the client commands need none of them.
    from mcrelay.supervisor.start import run

    options = DaemonOptions(
        control_socket=control_socket,
        num_workers=num_workers,
        config_file=config_file,
        keep_runtime_rules=keep_runtime_rules,
        state_dir=state_dir,
        log_level=log_level,
        socket_group=socket_group,
        read_group=read_group,
        allow_input_interface=tuple(allow_input_interface or ()),
        allow_output=tuple(allow_output or ()),
        allow_host_input=tuple(allow_host_input or ()),
        allow_loopback=allow_loopback,
        user=user,
        control_user=control_user,
        unsafe_keep_worker_root=unsafe_keep_worker_root,
        pin_workers=pin_workers,
        capture_ring_mib=capture_ring_mib,
        exit_on_fatal=exit_on_fatal,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        stable_after=stable_after,
        heartbeat_timeout=heartbeat_timeout,
        data_heartbeat_timeout=data_heartbeat_timeout,
        max_failures=max_failures,
        failure_window=failure_window,
        metrics_listen=metrics_listen,
    )
    try:
        code = run(options)
    except BadOption as exc:
        raise typer.BadParameter(exc.reason, param_hint=f"'{exc.option}'") from None
    except McrelayError as exc:  # cannot start: exit 2, so systemd does not retry it
        typer.echo(f"mcrelay: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)
