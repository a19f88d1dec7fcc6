"""What the daemon answers to each client request, defined once, beside the requests.

The supervisor builds these structs, the control-plane worker relays them, and the client
library decodes them once (`mcrelay.client`), so the CLI, `mcrelay top`, the metrics endpoint
and the tests read attributes, never dictionary keys. Each request names its result type
(`mcrelay.ipc.messages.result_type`).

Field names and order are what ``--json`` prints (`public`): they are a public interface, and
only additions are allowed. States and reasons are plain ``str`` on the wire so a newer daemon's
new state still decodes (and is shown, not lost); their known values are
`mcrelay.ipc.vocabulary`'s.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mcrelay.ipc.vocabulary import COUNTED_DROPS, DropReason, RuleState, WorkerState
from mcrelay.rules import Rule

__all__ = [
    "COUNTED_DROPS",
    "Changed",
    "DropReason",
    "LogLevelIs",
    "OutputStats",
    "Pong",
    "Restarted",
    "Result",
    "RuleInfo",
    "RuleState",
    "RuleStats",
    "Rules",
    "RulesReplaced",
    "Stats",
    "WorkerInfo",
    "WorkerState",
    "Workers",
    "public",
]


class _Result(msgspec.Struct, tag_field="t", forbid_unknown_fields=True):
    """A whole result: tagged, so a reply carries exactly one of them."""


class _Part(msgspec.Struct, forbid_unknown_fields=True):
    """An entry inside a result."""


# --- ping, log level, restart-worker ----------------------------------------------------------


class Pong(_Result, tag="pong", kw_only=True):
    pong: bool = True
    protocol: int


class LogLevelIs(_Result, tag="log-level"):
    """The level every mcrelay process logs at (after the change, when one was asked)."""

    level: str


class Restarted(_Result, tag="restarted"):
    """The worker is being restarted (a control worker once this reply is on its way)."""

    id: str


# --- workers ----------------------------------------------------------------------------------


class WorkerInfo(_Part):
    """One worker slot as `mcrelay workers` lists it."""

    id: str
    kind: str
    pid: int | None
    #: A `WorkerState` value.
    state: str
    restarts: int
    #: Data workers: rules held at the last acknowledgement (None before one, and for control).
    rules: int | None = None
    digest: str | None = None
    failed_rules: int | None = None
    backoff_remaining_s: float | None = None
    recent_failures: int = 0
    #: Where an unreadable state file was moved at start (None: it was not).
    state_moved_aside: str | None = None


class Workers(_Result, tag="workers"):
    workers: list[WorkerInfo]


# --- rules ------------------------------------------------------------------------------------


class RuleInfo(Rule, frozen=True, omit_defaults=True):
    """A rule as `mcrelay rules` lists it: its own fields, its state, and why when it is not
    relayed (``reason``, absent otherwise)."""

    #: A `RuleState` value.
    state: str
    reason: str | None = None

    @classmethod
    def of(cls, rule: Rule, state: str, reason: str | None = None) -> RuleInfo:
        return cls(rule.id, rule.input, rule.outputs, state, reason)

    @property
    def rule(self) -> Rule:
        """The rule itself, without its live state (what a config file holds)."""
        return Rule(self.id, self.input, self.outputs)


class Rules(_Result, tag="rules"):
    rules: list[RuleInfo]


class Changed(_Result, tag="changed", omit_defaults=True):
    """A rule was added or removed. ``warning``: made, but not as durably as it should be."""

    id: str
    warning: str | None = None


class RulesReplaced(_Result, tag="replaced", omit_defaults=True):
    """What a ReplaceRules made (or, ``dry_run``, would make): ids added and removed, a
    changed rule's in both."""

    added: list[str]
    removed: list[str]
    dry_run: bool = False
    warning: str | None = None


# --- stats ------------------------------------------------------------------------------------


class OutputStats(_Part):
    #: The output's text form (``ADDR:PORT:IF[:TTL]``, `mcrelay.rules.Output.__str__`).
    output: str
    packets: int
    bytes: int
    errors: int
    pps: float
    bps: float


class RuleStats(_Part):
    id: str
    packets_in: int
    bytes_in: int
    pps_in: float
    bps_in: float
    outputs: list[OutputStats]


class Stats(_Result, tag="stats"):
    """Counters merged over every worker and every process a slot ever ran; rates over the
    last ``interval_s``."""

    rules: list[RuleStats]
    #: By `DropReason` value; only reasons seen so far.
    drops: dict[str, int]
    kernel_drops: int
    interval_s: float


Result = Pong | LogLevelIs | Restarted | Workers | Rules | Changed | RulesReplaced | Stats

#: Results shown as the list they hold: ``--json`` has always printed these as a JSON array.
_AS_LIST: dict[type[_Result], str] = {Workers: "workers", Rules: "rules"}


def public(result: Result) -> Any:
    """``result`` as plain data in its public shape (what ``--json`` prints): its fields in
    order without the tag, workers and rules as their bare lists, and every sequence a list,
    exactly as the same data decodes from the wire untyped."""
    field = _AS_LIST.get(type(result))
    value = getattr(result, field) if field is not None else result
    shown = msgspec.msgpack.decode(msgspec.msgpack.encode(value))
    if field is None:
        del shown["t"]
    return shown
