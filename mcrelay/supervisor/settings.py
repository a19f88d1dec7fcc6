"""Tunables of the supervisor, with the defaults documented in docs/reference.md.

This is where those defaults are written: `mcrelay.supervisor.options` reads them for
``mcrelay supervisor`` (and its ``--help``) instead of writing them again.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mcrelay.dataplane.ring_size import CAPTURE_RING_MIB
from mcrelay.policy import AccessPolicy
from mcrelay.supervisor.backoff import BackoffPolicy
from mcrelay.system.paths import DEFAULT_CONTROL_SOCKET
from mcrelay.system.privileges import DEFAULT_CONTROL_USER, DEFAULT_DATA_USER

__all__ = ["DEFAULT_CONTROL_SOCKET", "SupervisorSettings"]


@dataclasses.dataclass(frozen=True)
class SupervisorSettings:
    control_socket: Path = DEFAULT_CONTROL_SOCKET
    num_workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    backoff: BackoffPolicy = dataclasses.field(default_factory=BackoffPolicy)
    max_failures: int = 10
    failure_window: float = 60.0
    exit_on_fatal: bool = False
    #: The control worker's heartbeat (and every send's deadline, `WorkerSlot.send_deadline`).
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0
    #: Data workers' heartbeat timeout, three beats to it (`data_heartbeat_interval`): their
    #: loop never blocks for long (a block at a time), so a hung one is noticed quickly, and
    #: its rings hold its traffic until the replacement runs. While one owes the
    #: acknowledgement of rules it was sent it gets `heartbeat_timeout`.
    data_heartbeat_timeout: float = 0.3
    #: How long a new worker may take to say hello and acknowledge its rules.
    startup_timeout: float = 10.0
    #: How long a worker may take to exit after Stop before it is killed.
    stop_grace: float = 1.0
    #: How long a rule change waits for running data workers to acknowledge it.
    ack_timeout: float = 2.0
    log_level: str = "info"
    #: Group allowed to use the control socket besides root (None: root only).
    socket_gid: int | None = None
    #: Group allowed to read (ping, workers, rules, stats, log level) but change nothing.
    read_gid: int | None = None
    #: What rules may name (set by root with supervisor options; never through the socket).
    policy: AccessPolicy = dataclasses.field(default_factory=AccessPolicy)
    #: The unprivileged users workers run as (when the supervisor runs as root).
    worker_user: str = DEFAULT_DATA_USER
    control_user: str = DEFAULT_CONTROL_USER
    #: Run workers with root's uid when they cannot switch users (they still lose every capability).
    unsafe_keep_worker_root: bool = False
    #: When the --config file changed, keep the rules added at runtime on top of its rules.
    keep_runtime_rules: bool = False
    #: Pin data worker i to CPU i (modulo the CPUs this process may use).
    pin_workers: bool = False
    #: Each capture socket's ring, MiB: what it holds while a data worker is replaced.
    capture_ring_mib: int = CAPTURE_RING_MIB

    @property
    def data_heartbeat_interval(self) -> float:
        return self.data_heartbeat_timeout / 3
