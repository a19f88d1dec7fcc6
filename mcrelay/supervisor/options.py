"""The options of ``mcrelay supervisor``, their defaults and their checks, in one place.

The command line only parses: it fills a :class:`DaemonOptions` and hands it to
`mcrelay.supervisor.start.run`. Every default is read from where the daemon itself keeps it
(:class:`SupervisorSettings`, :class:`BackoffPolicy`, the rule store), never written again here
or in the CLI, so ``--help`` shows what the daemon does. The lower limits live here too: the CLI
hands them to typer (so ``--help`` shows the ranges) and :meth:`DaemonOptions.check` applies them
for callers that build options in code.
"""

from __future__ import annotations

import dataclasses
import grp
from pathlib import Path

from mcrelay.errors import McrelayError
from mcrelay.policy import AccessPolicy
from mcrelay.supervisor.backoff import BackoffPolicy
from mcrelay.supervisor.persistence import DEFAULT_STATE_DIR
from mcrelay.supervisor.settings import SupervisorSettings
from mcrelay.system.logs import check_log_level
from mcrelay.system.metrics import parse_listen

#: The daemon's own defaults, read once: the source of every default below.
_DEFAULT = SupervisorSettings()

#: The smallest value each numeric option takes (typer shows them as ranges in ``--help``).
MINIMUM: dict[str, int | float] = {
    "num_workers": 1,
    "backoff_initial": 0.001,
    "backoff_max": 0.001,
    "stable_after": 0,
    "heartbeat_timeout": 0.1,
    "data_heartbeat_timeout": 0.05,
    "max_failures": 1,
    "failure_window": 1,
    "capture_ring_mib": 1,
}
#: The largest ring per capture socket: a GiB of memory locked in the kernel per interface and
#: data worker is already a lot.
MAXIMUM: dict[str, int | float] = {"capture_ring_mib": 1024}


class BadOption(McrelayError):
    """An option value the daemon refuses before it starts: ``option`` names it, ``reason`` says
    why in one sentence (the CLI turns it into a usage error, exit code 2)."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason


@dataclasses.dataclass(frozen=True, kw_only=True)
class DaemonOptions:
    """Every option of ``mcrelay supervisor``, named as the command names them (``--backoff-max``
    is ``backoff_max``). An option left out has the daemon's default; None means "not given"
    where the default is an absence or depends on the machine (``num_workers``: one per CPU)."""

    control_socket: Path = _DEFAULT.control_socket
    num_workers: int | None = None
    config_file: Path | None = None
    keep_runtime_rules: bool = _DEFAULT.keep_runtime_rules
    state_dir: Path = DEFAULT_STATE_DIR
    log_level: str = _DEFAULT.log_level
    socket_group: str | None = None
    read_group: str | None = None
    allow_input_interface: tuple[str, ...] = ()
    allow_output: tuple[str, ...] = ()
    allow_host_input: tuple[str, ...] = ()
    allow_loopback: bool = _DEFAULT.policy.allow_loopback
    user: str = _DEFAULT.worker_user
    control_user: str = _DEFAULT.control_user
    unsafe_keep_worker_root: bool = _DEFAULT.unsafe_keep_worker_root
    pin_workers: bool = _DEFAULT.pin_workers
    capture_ring_mib: int = _DEFAULT.capture_ring_mib
    exit_on_fatal: bool = _DEFAULT.exit_on_fatal
    backoff_initial: float = _DEFAULT.backoff.initial
    backoff_max: float = _DEFAULT.backoff.maximum
    stable_after: float = _DEFAULT.backoff.stable_after
    heartbeat_timeout: float = _DEFAULT.heartbeat_timeout
    data_heartbeat_timeout: float = _DEFAULT.data_heartbeat_timeout
    max_failures: int = _DEFAULT.max_failures
    failure_window: float = _DEFAULT.failure_window
    metrics_listen: str | None = None

    def check(self) -> None:
        """BadOption for the first value the daemon cannot run with (nothing is looked up)."""
        for name, minimum in MINIMUM.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise BadOption(_flag(name), f"{value} is below the minimum {minimum}")
        for name, maximum in MAXIMUM.items():
            value = getattr(self, name)
            if value is not None and value > maximum:
                raise BadOption(_flag(name), f"{value} is above the maximum {maximum}")
        try:
            check_log_level(self.log_level)
        except McrelayError as exc:
            raise BadOption("--log-level", str(exc)) from None
        if self.backoff_max < self.backoff_initial:
            raise BadOption("--backoff-max", "must be at least --backoff-initial")
        if self.metrics_listen is not None:
            try:
                parse_listen(self.metrics_listen)
            except McrelayError as exc:
                raise BadOption("--metrics-listen", str(exc)) from None

    def settings(self) -> SupervisorSettings:
        """The supervisor's settings for these options: :meth:`check`, then the groups and the
        access policy, each refusal a McrelayError of one sentence naming the option."""
        self.check()
        socket_gid = _group_id(self.socket_group, "--socket-group")
        read_gid = _group_id(self.read_group, "--read-group")
        policy = AccessPolicy.from_options(
            input_interfaces=self.allow_input_interface,
            outputs=self.allow_output,
            host_inputs=self.allow_host_input,
            allow_loopback=self.allow_loopback,
        )
        return SupervisorSettings(
            control_socket=self.control_socket,
            num_workers=_DEFAULT.num_workers if self.num_workers is None else self.num_workers,
            backoff=BackoffPolicy(self.backoff_initial, self.backoff_max, self.stable_after),
            max_failures=self.max_failures,
            failure_window=self.failure_window,
            exit_on_fatal=self.exit_on_fatal,
            pin_workers=self.pin_workers,
            capture_ring_mib=self.capture_ring_mib,
            keep_runtime_rules=self.keep_runtime_rules,
            worker_user=self.user,
            control_user=self.control_user,
            unsafe_keep_worker_root=self.unsafe_keep_worker_root,
            socket_gid=socket_gid,
            read_gid=read_gid,
            policy=policy,
            heartbeat_timeout=self.heartbeat_timeout,
            # Three beats per timeout, never slower than the default beat.
            heartbeat_interval=min(_DEFAULT.heartbeat_interval, self.heartbeat_timeout / 3),
            data_heartbeat_timeout=self.data_heartbeat_timeout,
            log_level=self.log_level,
        )


#: Every option at its default: what ``mcrelay supervisor --help`` shows.
DEFAULTS = DaemonOptions()


class NoSuchGroup(McrelayError):
    """A ``--socket-group``/``--read-group`` that names no group of this host."""


def _group_id(name: str | None, option: str) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise NoSuchGroup(f"{option} {name}: no such group") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
