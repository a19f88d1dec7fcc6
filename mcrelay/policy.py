"""What a rule may name: the access policy root sets with supervisor options, never the socket.

Rules come from anyone the control socket admits (``--socket-group``), so without a policy a
group member could capture the loopback interface (the host's DNS, SNMP or syslog on 127.0.0.x),
capture unicast traffic addressed to the host itself, or inject UDP into local services through a
127.0.0.1 output. The default policy refuses exactly that and allows everything else:

- ``lo`` (or any loopback interface) and 127.0.0.0/8, as input or output, unless
  ``--allow-loopback``;
- an input address that belongs to this host (a unicast address on one of its interfaces),
  unless ``--allow-host-input`` names it;
- with ``--allow-input-interface`` given, inputs only on the interfaces it names;
- with ``--allow-output`` given, outputs only to the destinations it names.

A refused rule is told in one sentence that names the policy line. The check is pure: the
host's addresses and the loopback test are passed in, so unit tests need no network.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Collection, Iterable

from mcrelay.errors import ConfigError
from mcrelay.rules import Output, Rule

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
LOOPBACK_INTERFACE = "lo"


class PolicyError(ConfigError):
    """A policy option is malformed; the message names the option and the problem."""


@dataclasses.dataclass(frozen=True)
class Destination:
    """``PREFIX[:PORT[-PORT]][%INTERFACE]``: addresses, an optional port range and interface."""

    network: ipaddress.IPv4Network
    ports: tuple[int, int] | None = None
    interface: str | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str, option: str) -> Destination:
        spec, _, interface = text.partition("%")
        prefix, _, ports = spec.partition(":")

        def bad(why: str) -> PolicyError:
            return PolicyError(f"{option} {text!r}: {why} (use PREFIX[:PORTS][%INTERFACE])")

        if "%" in text and not interface:
            raise bad("an interface name must follow %")
        try:
            network = ipaddress.IPv4Network(prefix, strict=False)
        except ValueError:
            raise bad(f"{prefix!r} is not an IPv4 address or prefix") from None
        port_range = None
        if ":" in spec:
            low, _, high = ports.partition("-")
            try:
                port_range = (int(low), int(high or low))
            except ValueError:
                raise bad(f"{ports!r} is not a port or a range of ports") from None
            if not 1 <= port_range[0] <= port_range[1] <= 65535:
                raise bad(f"ports {ports} are not a range within 1-65535")
        return cls(network, port_range, interface or None, text)

    def matches(self, address: str, port: int, interface: str | None) -> bool:
        if ipaddress.IPv4Address(address) not in self.network:
            return False
        if self.ports is not None and not self.ports[0] <= port <= self.ports[1]:
            return False
        return self.interface is None or self.interface == interface


@dataclasses.dataclass(frozen=True)
class AccessPolicy:
    """The supervisor's options, as data. Empty tuples mean "no restriction of that kind"."""

    input_interfaces: tuple[str, ...] = ()
    outputs: tuple[Destination, ...] = ()
    host_inputs: tuple[Destination, ...] = ()
    allow_loopback: bool = False

    @classmethod
    def from_options(
        cls,
        *,
        input_interfaces: Iterable[str] = (),
        outputs: Iterable[str] = (),
        host_inputs: Iterable[str] = (),
        allow_loopback: bool = False,
    ) -> AccessPolicy:
        return cls(
            input_interfaces=tuple(input_interfaces),
            outputs=tuple(Destination.parse(o, "--allow-output") for o in outputs),
            host_inputs=tuple(Destination.parse(h, "--allow-host-input") for h in host_inputs),
            allow_loopback=allow_loopback,
        )

    def describe(self) -> list[str]:
        """The policy as the options that set it, for the start-up log."""
        lines = [f"--allow-input-interface {i}" for i in self.input_interfaces]
        lines += [f"--allow-output {d.text}" for d in self.outputs]
        lines += [f"--allow-host-input {d.text}" for d in self.host_inputs]
        if self.allow_loopback:
            lines.append("--allow-loopback")
        return lines

    def refusal(
        self,
        rule: Rule,
        *,
        host_addresses: Callable[[], Collection[ipaddress.IPv4Address]],
        is_loopback: Callable[[str], bool],
    ) -> str | None:
        """None when ``rule`` is allowed, else the one sentence that says which line refuses it."""
        reason = self._input_refusal(rule, host_addresses, is_loopback)
        if reason is None:
            for output in rule.outputs:
                reason = self._output_refusal(output, is_loopback)
                if reason is not None:
                    break
        return None if reason is None else f"rule {rule.id} is refused by policy: {reason}"

    def _input_refusal(
        self,
        rule: Rule,
        host_addresses: Callable[[], Collection[ipaddress.IPv4Address]],
        is_loopback: Callable[[str], bool],
    ) -> str | None:
        inp = rule.input
        address = ipaddress.IPv4Address(inp.group)
        if not self.allow_loopback:
            if is_loopback(inp.interface):
                return (
                    f"input interface {inp.interface} is the loopback interface "
                    "(allowed only with --allow-loopback)"
                )
            if address in LOOPBACK:
                return (
                    f"input {address} is a loopback address (127.0.0.0/8 is allowed only with "
                    "--allow-loopback)"
                )
        if self.input_interfaces and inp.interface not in self.input_interfaces:
            allowed = ", ".join(self.input_interfaces)
            return f"input interface {inp.interface} is not in --allow-input-interface ({allowed})"
        if address.is_multicast or address in LOOPBACK:
            return None
        if any(d.matches(inp.group, inp.port, inp.interface) for d in self.host_inputs):
            return None
        if address in host_addresses():
            return (
                f"input {address} is an address of this host (allowed only with --allow-host-input)"
            )
        return None

    def _output_refusal(self, output: Output, is_loopback: Callable[[str], bool]) -> str | None:
        where = f"output {output.group}:{output.port} on {output.interface}"
        if not self.allow_loopback:
            if is_loopback(output.interface):
                return f"{where} uses the loopback interface (allowed only with --allow-loopback)"
            if ipaddress.IPv4Address(output.group) in LOOPBACK:
                return f"{where} is a loopback address (allowed only with --allow-loopback)"
        if self.outputs and not any(
            d.matches(output.group, output.port, output.interface) for d in self.outputs
        ):
            allowed = ", ".join(d.text for d in self.outputs)
            return f"{where} matches no --allow-output ({allowed})"
        return None


def check(
    policy: AccessPolicy,
    rules: Iterable[Rule],
    *,
    host_addresses: Callable[[], Collection[ipaddress.IPv4Address]],
    is_loopback: Callable[[str], bool],
) -> tuple[list[Rule], dict[str, tuple[Rule, str]]]:
    """Split ``rules`` into those the policy allows and those it refuses (with the reason).

    The host's addresses are read at most once per call, and only if a rule needs them; each
    interface is looked up once.
    """
    cached: list[Collection[ipaddress.IPv4Address]] = []

    def addresses() -> Collection[ipaddress.IPv4Address]:
        if not cached:
            cached.append(host_addresses())
        return cached[0]

    loopback: dict[str, bool] = {}

    def is_loopback_once(interface: str) -> bool:
        if interface not in loopback:
            loopback[interface] = is_loopback(interface)
        return loopback[interface]

    allowed: list[Rule] = []
    refused: dict[str, tuple[Rule, str]] = {}
    for rule in rules:
        reason = policy.refusal(rule, host_addresses=addresses, is_loopback=is_loopback_once)
        if reason is None:
            allowed.append(rule)
        else:
            refused[rule.id] = (rule, reason)
    return allowed, refused
