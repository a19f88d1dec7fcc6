"""Every message mcrelay puts on a wire, defined once, with the protocol version.

Two conversations share these definitions: supervisor↔worker socketpairs and client↔control-plane
worker connections on the control socket. Each is a tagged union (field ``t``), so a decoder
rejects anything that is not one of its members.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Generic, Literal, TypeVar, get_args

import msgspec

from mcrelay.errors import ProtocolError
from mcrelay.ipc import replies as r
from mcrelay.rules import MAX_RULES, Rule

#: 2: replies are typed (`mcrelay.ipc.replies`), each result tagged.
PROTOCOL_VERSION = 2

#: Largest counter or sequence number a worker may report. Workers are not trusted further than
#: clients: a bound far beyond any real count (2^62 bytes is 11 years at 100 Gbit/s) keeps every
#: sum the supervisor makes encodable; a frame outside it is a protocol error that restarts the
#: worker.
MAX_COUNT = 2**62
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
#: Drop reasons a data worker may report: `mcrelay.ipc.vocabulary.DropReason` values, bounded
#: text on the wire (a worker is not trusted to name only those).
DropLabel = Annotated[str, msgspec.Meta(max_length=32)]
MAX_DROP_REASONS = 64

#: Why a worker could not install a rule (an exception's text, cut to this length).
MAX_REASON_LENGTH = 200
FailureReason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_LENGTH)]
RuleId = Annotated[str, msgspec.Meta(max_length=64)]

WorkerKind = Literal["control", "data"]
Role = Literal["supervisor", "control", "data", "client"]


class _Msg(msgspec.Struct, tag_field="t", forbid_unknown_fields=True):
    pass


class Hello(_Msg, tag="hello"):
    """First frame in each direction of every channel; a version mismatch ends the channel."""

    version: int
    role: Role
    worker_id: str = ""
    pid: int = 0
    log_level: str = "info"


class Heartbeat(_Msg, tag="hb"):
    n: int


class HeartbeatAck(_Msg, tag="hb-ack"):
    n: Count


class RuleSync(_Msg, tag="rule-sync"):
    """The full rule set: sent on every (re)start and whenever a digest disagrees."""

    seq: int
    rules: tuple[Rule, ...]


class RuleUpdate(_Msg, tag="rule-update"):
    seq: int
    added: tuple[Rule, ...] = ()
    removed: tuple[str, ...] = ()


class RuleAck(_Msg, tag="rule-ack"):
    seq: Count
    count: Count
    digest: Annotated[str, msgspec.Meta(max_length=128)]
    #: Rules held (and digested) but not installed, with why; the worker relays the others.
    failed: Annotated[dict[RuleId, FailureReason], msgspec.Meta(max_length=MAX_RULES)] = {}


class SetLogLevel(_Msg, tag="log-level"):
    level: str


class Stop(_Msg, tag="stop"):
    """Finish cleanly and exit 0; the supervisor kills whoever is still there after a grace."""


class ListenSocket(_Msg, tag="listen-socket"):
    """Carries the control socket's listening descriptor (one fd) to the control-plane worker,
    with who may use it: root, ``owner_uid`` (the supervisor's user) and group ``allowed_gid``
    everything; group ``read_gid`` only the requests that change nothing."""

    owner_uid: int = 0
    allowed_gid: int | None = None
    read_gid: int | None = None


Positive = Annotated[int, msgspec.Meta(gt=0)]


class CaptureSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The TPACKET_V3 receive ring of a capture socket: `block_count` blocks of `block_size`
    bytes (a power-of-two multiple of a page), frames bounded by `frame_size` (the kernel's
    check only: V3 packs frames at their own length), a partly filled block handed over after
    `retire_ms`.

    The supervisor installs the ring before bind (`mcrelay.dataplane.ring.configure`) and sends
    the same spec with the socket, so the worker maps exactly what is there: one set of values
    (`mcrelay.dataplane.ring_size.CAPTURE_RING`), not two that must agree. The kernel filter is
    not part of it: it stays the supervisor's, replaced in place while the worker holds the
    socket, and the worker may never touch it."""

    block_size: Positive
    block_count: Positive
    frame_size: Positive
    retire_ms: Positive

    @property
    def mapped_size(self) -> int:
        """Bytes of the ring's mapping."""
        return self.block_size * self.block_count

    @property
    def low_rate_cover_s(self) -> float:
        """How long the ring holds traffic nobody reads at low rates: each retire timeout
        closes a block, however few frames it holds (high rates fill the bytes first)."""
        return self.block_count * self.retire_ms / 1000


class AttachCapture(_Msg, tag="attach-capture"):
    """Carries one AF_PACKET socket (one fd) bound to ``interface``, already in its fanout
    group, with the ring `ring` installed on it."""

    interface: str
    ring: CaptureSpec


class DetachCapture(_Msg, tag="detach-capture"):
    interface: str


class CounterPage(_Msg, tag="counter-page"):
    """Carries the worker's counter page (one fd, a sealed memfd): the worker keeps its
    counters there, where the supervisor reads them after the process is gone, however it
    died (layout: `mcrelay.ipc.counter_page`). Sent once per process, before any rules."""


class OutputCounters(msgspec.Struct, array_like=True):
    packets: Count = 0
    bytes: Count = 0
    errors: Count = 0


class RuleCounters(msgspec.Struct):
    """Counters of one rule in one worker, cumulative since that worker started."""

    packets_in: Count = 0
    bytes_in: Count = 0
    #: Keyed by the output's text form (``ADDR:PORT:IF[:TTL]``), stable across rule edits.
    outputs: dict[str, OutputCounters] = msgspec.field(default_factory=dict)

    def fold(self, other: RuleCounters, combine: Callable[[int, int], int]) -> None:
        """Make each of this rule's counts ``combine(mine, other's)``, output by output (an
        output only ``other`` has starts from 0): the one walk every merge of counters uses
        (sums, differences for rates, a floor under a dead worker's page)."""
        self.packets_in = combine(self.packets_in, other.packets_in)
        self.bytes_in = combine(self.bytes_in, other.bytes_in)
        outputs = self.outputs
        for key, theirs in other.outputs.items():
            mine = outputs.get(key)
            if mine is None:
                mine = outputs[key] = OutputCounters()
            mine.packets = combine(mine.packets, theirs.packets)
            mine.bytes = combine(mine.bytes, theirs.bytes)
            mine.errors = combine(mine.errors, theirs.errors)

    def copy(self) -> RuleCounters:
        outputs = {k: OutputCounters(o.packets, o.bytes, o.errors) for k, o in self.outputs.items()}
        return RuleCounters(self.packets_in, self.bytes_in, outputs)


class StatsReport(_Msg, tag="stats"):
    """Pushed by data workers every interval: cumulative counters since the worker started.

    ``rules`` holds only the rules whose counts changed since the process's previous report
    (all with any count in its first): the others keep the values last reported, so an idle
    10,000-rule table costs a few bytes a second, not megabytes."""

    rules: dict[str, RuleCounters]
    drops: Annotated[dict[DropLabel, Count], msgspec.Meta(max_length=MAX_DROP_REASONS)]
    kernel_drops: Count = 0


class ControlRequest(_Msg, tag="control-request"):
    """A validated client request, forwarded by the control-plane worker."""

    req_id: int
    request: ClientRequest


class ControlReply(_Msg, tag="control-reply"):
    req_id: int
    reply: Reply


# --- client requests (control socket) ------------------------------------------------------

R = TypeVar("R", bound=r.Result)


class Request(_Msg, Generic[R]):
    """A client request whose successful reply carries an ``R`` (see `result_type`)."""


class Ping(Request[r.Pong], tag="ping"):
    pass


class ListWorkers(Request[r.Workers], tag="workers"):
    pass


class AddRule(Request[r.Changed], tag="add"):
    rule: Rule


class RemoveRule(Request[r.Changed], tag="remove"):
    id: str


class ListRules(Request[r.Rules], tag="rules"):
    pass


class GetStats(Request[r.Stats], tag="stats-request"):
    pass


class LogLevel(Request[r.LogLevelIs], tag="log-level-request"):
    """Set the level everywhere when ``level`` is given; report it either way."""

    level: str | None = None


class RestartWorker(Request[r.Restarted], tag="restart-worker"):
    id: str


class ReplaceRules(Request[r.RulesReplaced], tag="replace-rules"):
    """Make the table equal to ``rules``: only the difference is applied. ``dry_run``: check
    them as for the change and answer what it would be, changing nothing."""

    rules: tuple[Rule, ...]
    dry_run: bool = False


class Reply(_Msg, tag="reply"):
    """The answer to one request: ``result`` (of the request's `result_type`) when ``ok``,
    else ``error``."""

    ok: bool
    result: r.Result | None = None
    error: str | None = None


def result_type(request: Request[R]) -> type[R]:
    """The result type a successful reply to ``request`` carries."""
    for base in getattr(type(request), "__orig_bases__", ()):
        args = get_args(base)
        if args:
            result: type[R] = args[0]
            return result
    raise TypeError(f"{type(request).__name__} names no result type")


def result_of(request: Request[R], reply: Reply) -> R:
    """What a successful ``reply`` to ``request`` answered; ProtocolError when it is not the
    request's result type (a peer's mistake, never the caller's)."""
    expected = result_type(request)
    if not isinstance(reply.result, expected):
        got = type(reply.result).__name__
        raise ProtocolError(
            f"{type(request).__name__} answered with {got}, not {expected.__name__}"
        )
    return reply.result


ClientRequest = (
    Ping
    | ListWorkers
    | AddRule
    | RemoveRule
    | ListRules
    | GetStats
    | LogLevel
    | RestartWorker
    | ReplaceRules
)

SupervisorToWorker = (
    Hello
    | Heartbeat
    | RuleSync
    | RuleUpdate
    | SetLogLevel
    | Stop
    | ListenSocket
    | AttachCapture
    | DetachCapture
    | CounterPage
    | ControlReply
)
WorkerToSupervisor = Hello | HeartbeatAck | RuleAck | StatsReport | ControlRequest
ClientToServer = Hello | ClientRequest
ServerToClient = Hello | Reply
