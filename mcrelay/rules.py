"""The rule model: what a relay rule is, how it is validated, named and digested.

Defined once and used by the CLI, the config file, the control-plane worker (which validates
untrusted input), the supervisor's rule table and the data-plane workers (which check the digest).
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Iterable

import msgspec

from mcrelay.errors import RuleError

#: TTL of an output (multicast or unicast) unless the rule says otherwise: enough to cross a
#: few routers.
DEFAULT_TTL = 16
MAX_OUTPUTS = 64
#: Largest rule table, and most outputs over all its rules: a change past either is refused.
#: A full table then stays a few MiB on every channel (rule sync, `rules`, `stats`).
MAX_RULES = 20_000
MAX_TABLE_OUTPUTS = 200_000
# fullmatch, not "$" (which also matches before a trailing newline); interface names exclude
# whitespace, '/', ':' and control characters such as NUL, which the kernel cannot take.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_IFNAME_RE = re.compile(r"[^\s/:\x00-\x1f\x7f]{1,15}")
_LINK_LOCAL_PREFIX = 0xE00000  # 224.0.0.0/24, as the top 24 bits of an address


#: interface, group, port, source, VLAN id: what two rules must not share.
MatchKey = tuple[str, str, int, str | None, int | None]


class RuleInput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    interface: str
    group: str
    port: int
    source: str | None = None
    #: The 802.1Q VLAN id the frames carry; None: untagged frames only.
    vlan: int | None = None


class Output(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    group: str
    port: int
    interface: str
    ttl: int = DEFAULT_TTL

    def __str__(self) -> str:
        text = f"{self.group}:{self.port}:{self.interface}"
        return text if self.ttl == DEFAULT_TTL else f"{text}:{self.ttl}"


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    input: RuleInput
    outputs: tuple[Output, ...]

    @property
    def match_key(self) -> MatchKey:
        """Two rules with the same key would compete for the same packets."""
        i = self.input
        return (i.interface, i.group, i.port, i.source, i.vlan)


def default_rule_id(
    interface: str, group: str, port: int, source: str | None = None, vlan: int | None = None
) -> str:
    """Stable id, so re-adding the same input yields the same name on every host."""
    text = f"{interface}|{group}|{port}" + (f"|{source}" if source else "")
    if vlan is not None:
        text += f"|vlan={vlan}"
    return "r-" + hashlib.sha256(text.encode()).hexdigest()[:10]


def _address(text: str, what: str) -> int:
    """The address as an integer (inet_pton: a strict dotted quad, and ~20x faster than
    ipaddress, which matters for the 100,000 addresses of a large table)."""
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, TypeError, ValueError):  # ValueError: an embedded NUL
        raise RuleError(f"{what}: {text!r} is not an IPv4 address") from None
    if value in (0, 0xFFFFFFFF):
        raise RuleError(f"{what}: {text} cannot be relayed")
    if value >> 8 == _LINK_LOCAL_PREFIX:
        raise RuleError(
            f"{what}: {text} is a link-local group (224.0.0.0/24), which routers never forward "
            "and mcrelay never relays"
        )
    return value


def _port(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise RuleError(f"{what}: port {value!r} is outside 1-65535")


def _interface(name: str, what: str) -> None:
    if not isinstance(name, str) or not _IFNAME_RE.fullmatch(name):
        raise RuleError(f"{what}: {name!r} is not a valid interface name")


def validate(rule: Rule) -> Rule:
    """Raise RuleError naming the first problem; return the rule unchanged when it is valid."""
    if not isinstance(rule.id, str) or not _ID_RE.fullmatch(rule.id):
        raise RuleError(
            f"rule id {rule.id!r}: use 1-64 letters, digits, '_', '.', ':' or '-', "
            "starting with a letter or digit"
        )
    inp = rule.input
    _interface(inp.interface, "input interface")
    _address(inp.group, "input group")
    _port(inp.port, "input")
    if inp.source is not None and _address(inp.source, "input source") >> 28 == 0xE:
        raise RuleError(f"input source: {inp.source} is a multicast address")
    if inp.vlan is not None and (
        isinstance(inp.vlan, bool) or not isinstance(inp.vlan, int) or not 1 <= inp.vlan <= 4094
    ):
        raise RuleError(f"input vlan: {inp.vlan!r} is outside 1-4094")
    if not rule.outputs:
        raise RuleError("a rule needs at least one output")
    if len(rule.outputs) > MAX_OUTPUTS:
        raise RuleError(f"a rule has at most {MAX_OUTPUTS} outputs")
    seen: set[tuple[str, int, str]] = set()
    for out in rule.outputs:
        _interface(out.interface, f"output {out}")
        _address(out.group, f"output {out}")
        _port(out.port, f"output {out}")
        if not 1 <= out.ttl <= 255:
            raise RuleError(f"output {out}: ttl {out.ttl} is outside 1-255")
        key = (out.group, out.port, out.interface)
        if key in seen:
            raise RuleError(f"output {out} is listed twice")
        seen.add(key)
        if key == (inp.group, inp.port, inp.interface):
            raise RuleError(f"output {out} is the rule's own input: that would be a loop")
    return rule


def parse_output(text: str) -> Output:
    """``ADDR:PORT:IF`` or ``ADDR:PORT:IF:TTL``, as typed on the command line."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise RuleError(f"output {text!r}: expected ADDR:PORT:INTERFACE[:TTL]")
    group, port_text, interface = parts[:3]
    try:
        port = int(port_text)
        ttl = int(parts[3]) if len(parts) == 4 else DEFAULT_TTL
    except ValueError:
        raise RuleError(f"output {text!r}: port and ttl must be numbers") from None
    return Output(group=group, port=port, interface=interface, ttl=ttl)


def make_rule(
    *,
    interface: str,
    group: str,
    port: int,
    outputs: Iterable[Output],
    source: str | None = None,
    vlan: int | None = None,
    rule_id: str | None = None,
) -> Rule:
    """Build and validate a rule from user-facing fields."""
    if rule_id is None:
        rule_id = default_rule_id(interface, group, port, source, vlan)
    rule = Rule(
        id=rule_id,
        input=RuleInput(interface=interface, group=group, port=port, source=source, vlan=vlan),
        outputs=tuple(outputs),
    )
    return validate(rule)


_digest_encoder = msgspec.msgpack.Encoder()


class _UntaggedInput(msgspec.Struct, frozen=True):
    """A rule input without a VLAN as it was encoded before inputs could name one."""

    interface: str
    group: str
    port: int
    source: str | None


class _UntaggedRule(msgspec.Struct, frozen=True):
    id: str
    input: _UntaggedInput
    outputs: tuple[Output, ...]


def _digested(rule: Rule) -> Rule | _UntaggedRule:
    """What the digest covers: a rule without a VLAN encodes without the field, so its digest
    is the one it had before inputs could name a VLAN."""
    i = rule.input
    if i.vlan is not None:
        return rule
    return _UntaggedRule(
        rule.id, _UntaggedInput(i.interface, i.group, i.port, i.source), rule.outputs
    )


def digest(rules: Iterable[Rule]) -> str:
    """Digest of a whole rule set, outputs included; equal sets give equal digests anywhere."""
    ordered = [_digested(r) for r in sorted(rules, key=lambda r: r.id)]
    return hashlib.sha256(_digest_encoder.encode(ordered)).hexdigest()[:16]
