"""Network-namespace topologies for packet tests.

Every namespace is created here with a unique name and deleted on exit, also when the test fails,
so traffic never leaves namespaces the test made and nothing is left behind. Addresses are
assigned inside those namespaces only (10.200.0.0/16); groups are 239.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence


def have_netns() -> bool:
    """True when this process can create namespaces (root with `ip` installed)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


@dataclasses.dataclass(frozen=True)
class Netns:
    name: str

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 20) -> str:
        result = subprocess.run(
            self.cmd(*argv), check=check, capture_output=True, text=True, timeout=timeout
        )
        return result.stdout

    def ip(self, *args: str) -> str:
        return self.run("ip", *args)

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


@contextlib.contextmanager
def namespaces(*roles: str) -> Iterator[dict[str, Netns]]:
    """Create one namespace per role (names are unique per call) and delete them all on exit."""
    tag = secrets.token_hex(3)
    created: dict[str, Netns] = {}
    try:
        for role in roles:
            ns = Netns(f"mcr-{role}-{tag}")
            _ip("netns", "add", ns.name)
            created[role] = ns
            ns.ip("link", "set", "lo", "up")
        yield created
    finally:
        for ns in created.values():
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=20)


def veth(a: Netns, a_if: str, a_addr: str | None, b: Netns, b_if: str, b_addr: str | None) -> None:
    """Connect two namespaces with a veth pair; addresses are CIDR strings or None."""
    a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
        if addr:
            ns.ip("addr", "add", addr, "dev", ifname)
        ns.ip("link", "set", ifname, "up")
    for ns, ifname in ((a, a_if), (b, b_if)):
        wait_running(ns, ifname)


def wait_running(ns: Netns, ifname: str, timeout: float = 5.0) -> None:
    """Until ``ifname`` has its carrier (operstate up): the kernel sets it a moment after the
    link is set up, and a relay that sees it change would re-create its captures meanwhile."""
    deadline = time.monotonic() + timeout
    while ns.run("cat", f"/sys/class/net/{ifname}/operstate").strip() != "up":
        if time.monotonic() > deadline:
            raise AssertionError(f"{ifname} in {ns.name} is not up within {timeout} s")
        time.sleep(0.01)


@dataclasses.dataclass(frozen=True)
class Chain:
    """gen-ns --(gen0/relay-in)--> relay-ns --(relay-out/sink0)--> sink-ns."""

    gen: Netns
    relay: Netns
    sink: Netns
    gen_if: str = "gen0"
    relay_in: str = "rin0"
    relay_out: str = "rout0"
    sink_if: str = "sink0"
    gen_addr: str = "10.200.1.1"
    relay_in_addr: str = "10.200.1.2"
    relay_out_addr: str = "10.200.2.1"
    sink_addr: str = "10.200.2.2"


@contextlib.contextmanager
def chain(extra_roles: Sequence[str] = ()) -> Iterator[Chain]:
    """The standard relay topology; multicast routes point at the veths so senders need no -I."""
    with namespaces("gen", "relay", "sink", *extra_roles) as ns:
        c = Chain(ns["gen"], ns["relay"], ns["sink"])
        veth(c.gen, c.gen_if, f"{c.gen_addr}/24", c.relay, c.relay_in, f"{c.relay_in_addr}/24")
        veth(c.relay, c.relay_out, f"{c.relay_out_addr}/24", c.sink, c.sink_if, f"{c.sink_addr}/24")
        c.gen.ip("route", "add", "239.0.0.0/8", "dev", c.gen_if)
        c.sink.ip("route", "add", "239.0.0.0/8", "dev", c.sink_if)
        yield c
