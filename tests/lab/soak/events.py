"""One induced event and everything measured about it: what was hit, how long recovery took,
and where each lost datagram went."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Event:
    kind: str
    at_s: float = 0.0  # since the chaos phase started
    victim: str = ""
    pre_s: float = 0.0
    recovery_s: float | None = None  # event → everything running with every rule again
    detected_s: float | None = None  # stop-worker: SIGSTOP → slot no longer running
    hold_s: float | None = None  # SIGSTOP → SIGCONT, or link down → up
    replaced: list[str] = dataclasses.field(default_factory=list)  # slots on a new process
    churn: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sent: int = 0
    lost: int = 0
    lost_by_stream: list[int] = dataclasses.field(default_factory=list)
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    # Where datagrams were dropped, to tell the relay's losses from the test bed's: the relay's
    # rings (kernel_drops) and refused sends (output errors), from `mcrelay stats`; veth and
    # per-CPU backlog drops (netdev_max_backlog; host-wide, so other work can add to them); the
    # sinks' own receive buffers.
    drops: dict[str, int] = dataclasses.field(default_factory=dict)
    log_tracebacks: int = 0  # "Traceback" lines the supervisor's and workers' stderr gained
    problems: list[str] = dataclasses.field(default_factory=list)
