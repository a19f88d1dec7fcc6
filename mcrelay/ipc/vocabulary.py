"""The words every process and every client agree on: worker states, rule states, drop reasons.

Defined once here and imported by the supervisor (which decides them), the data workers (which
count drops), the client library's reply types, `mcrelay top` and the metrics endpoint. They are
`StrEnum`s, so a member is also its stable text: what `--json` prints and what metrics label.
"""

from __future__ import annotations

import enum


class WorkerState(enum.StrEnum):
    """A worker slot's state, named like supervisord's (`mcrelay.supervisor.states` moves it)."""

    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"


class RuleState(enum.StrEnum):
    """What a listed rule is doing."""

    ACTIVE = "active"  # captured and relayed
    PAUSED = "paused"  # its input interface is down
    UNRESOLVED = "unresolved"  # no such input interface (yet)
    REFUSED = "refused"  # the access policy refuses it: kept, listed, never installed
    FAILED = "failed"  # a data worker could not install it


class DropReason(enum.StrEnum):
    """Why a data worker saw a frame and did not relay it (its stable stats key)."""

    TRUNCATED = "truncated"  # a header or length field claims bytes the frame does not have
    MALFORMED = "malformed"  # impossible header values: version, IHL, lengths too small
    NOT_IPV4 = "not_ipv4"  # ethertype after any VLAN tags is not IPv4
    FRAGMENT = "fragment"  # MF set or a fragment offset: only whole datagrams are relayed
    NOT_UDP = "not_udp"
    OUTGOING = "outgoing"  # sent by this host (the capture sockets normally never see these)
    VLAN = "vlan"  # more than one VLAN tag, or a tag where none is expected
    NO_RULE = "no_rule"  # no rule for the destination
    SOURCE_FILTERED = "source_filtered"  # a rule for the destination, not for this sender


#: The documented reasons (docs/reference.md § Drop reasons), in the order they are shown: the
#: metrics endpoint exports them as 0 until seen, so a rate() over them works from the start.
COUNTED_DROPS: tuple[DropReason, ...] = (
    DropReason.TRUNCATED,
    DropReason.MALFORMED,
    DropReason.NOT_IPV4,
    DropReason.FRAGMENT,
    DropReason.NOT_UDP,
    DropReason.NO_RULE,
    DropReason.SOURCE_FILTERED,
    DropReason.VLAN,
)
