"""What a rule table costs, checked before a change is accepted.

A table the workers cannot hold would not fail on its own: it would crash-loop them, and being
saved already, do so again after every restart. So the supervisor prices a change first and
refuses it in one sentence naming the limit. Descriptors are priced for the interfaces that
exist now (a missing interface costs none: its outputs share one dead socket); one that appears
later and finds no descriptor left is counted as an egress error and retried, never a crash.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from collections.abc import Callable, Iterable

from mcrelay.errors import RuleError
from mcrelay.rules import MAX_RULES, MAX_TABLE_OUTPUTS, Rule

#: Descriptors a data worker holds whatever its rules: interpreter, channel, trio, the dead
#: output socket, with room to spare.
WORKER_BASE_FDS = 64
#: The supervisor's own: control and metrics sockets, netlink, spawner, logs, with room to spare.
SUPERVISOR_BASE_FDS = 128
#: Per worker slot in the supervisor: its channel, its pidfd, one in transit during a restart.
SUPERVISOR_FDS_PER_WORKER = 3


@dataclasses.dataclass(frozen=True)
class Cost:
    rules: int
    outputs: int
    #: Descriptors each data worker needs: one per (output interface, TTL, multicast or
    #: unicast) and one capture per input interface.
    worker_fds: int
    #: Descriptors the supervisor needs: a capture per input interface per data worker, group
    #: membership helpers and one channel per worker.
    supervisor_fds: int


def _is_multicast(address: str) -> bool:
    return socket.inet_pton(socket.AF_INET, address)[0] >> 4 == 0xE


def price(
    rules: Iterable[Rule],
    *,
    data_workers: int,
    memberships_per_socket: int,
    interface_exists: Callable[[str], bool],
) -> Cost:
    rules = tuple(rules)
    exists: dict[str, bool] = {}

    def present(name: str) -> bool:
        if name not in exists:
            exists[name] = interface_exists(name)
        return exists[name]

    egress = {
        (o.interface, o.ttl, _is_multicast(o.group))
        for r in rules
        for o in r.outputs
        if present(o.interface)
    }
    inputs = {r.input.interface for r in rules if present(r.input.interface)}
    groups = {
        (r.input.interface, r.input.group)
        for r in rules
        if r.input.interface in inputs and _is_multicast(r.input.group)
    }
    return Cost(
        rules=len(rules),
        outputs=sum(len(r.outputs) for r in rules),
        worker_fds=WORKER_BASE_FDS + len(egress) + len(inputs),
        supervisor_fds=SUPERVISOR_BASE_FDS
        + data_workers * len(inputs)
        + math.ceil(len(groups) / max(1, memberships_per_socket))
        + SUPERVISOR_FDS_PER_WORKER * (data_workers + 1),
    )


def check(cost: Cost, *, open_file_limit: int) -> None:
    """RuleError in one sentence naming the first limit the cost exceeds."""
    if cost.rules > MAX_RULES:
        raise RuleError(
            f"the rule table would hold {cost.rules} rules, over mcrelay's limit of {MAX_RULES}: "
            "nothing changed"
        )
    if cost.outputs > MAX_TABLE_OUTPUTS:
        raise RuleError(
            f"the rule table would hold {cost.outputs} outputs in all, over mcrelay's limit of "
            f"{MAX_TABLE_OUTPUTS}: nothing changed"
        )
    for who, needed in (
        ("each data worker", cost.worker_fds),
        ("the supervisor", cost.supervisor_fds),
    ):
        if needed > open_file_limit:
            raise RuleError(
                f"the rules would need about {needed} open files in {who}, over the open-file "
                f"limit of {open_file_limit} (raise LimitNOFILE= in the unit or ulimit -n): "
                "nothing changed"
            )
