"""The test bed of scripts/bench: namespaces, veths, CPU placements (docs/benchmarks/README.md).

Everything runs in network namespaces made by `tests.lab.topology.namespaces` (names
``mcr-*``, deleted on exit, also on failure). Processes are started with ``ip netns exec``,
tracked by PID and ended by PID before their namespace goes away.

Topology (one per system and repeat)::

    gen-ns  gen0 10.200.1.1 ──── rin0 10.200.1.2 (unroutable: 10.200.9.2)  relay-ns
            gdir0 10.200.3.1 ─┐       rout0 10.200.2.1 ──── sink0 10.200.2.2  sink-ns
                              └───────────────────────────── sdir0 10.200.3.2

gen0→rin0→(relay)→rout0→sink0 carries every relay; gdir0→sdir0 is the generator's ceiling (the
same generator and sink, nothing in between).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.lab.topology import Netns, namespaces, veth

ROOT = Path(__file__).resolve().parents[3]  # the checkout: child processes run from here
#: The traffic roles (gen, sink, hold), run as a module from ROOT inside a namespace.
TRAFFIC = ("-m", "tests.lab.bench.traffic")
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
IN_GROUP, IN_PORT = "239.1.1.1", 5000
OUT_GROUP, OUT_PORT = "239.2.2.2", 5001
GEN_ADDR = "10.200.1.1"
RELAY_IN_ADDR, RELAY_IN_UNROUTABLE = "10.200.1.2", "10.200.9.2"
RELAY_OUT_ADDR, SINK_ADDR = "10.200.2.1", "10.200.2.2"
SOCAT_BIG_RCVBUF = 8 << 20


@dataclasses.dataclass(frozen=True)
class Placement:
    """Which CPUs the relay and the generator+sink may use, and where RPS steers receive work.

    `rps` maps (namespace role, interface) to the CPU set that runs its receive path; veth
    delivers in the sender's context otherwise, which puts the relay's input work on the
    generator's CPU.
    """

    name: str
    relay_cpus: frozenset[int]
    other_cpus: frozenset[int]
    rps: dict[tuple[str, str], frozenset[int]]


def cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def placements(relay_cpu: int, other_cpu: int) -> dict[str, Placement]:
    every = frozenset(range(os.cpu_count() or 1))
    r, o = frozenset({relay_cpu}), frozenset({other_cpu})
    return {
        # the default: the relay and its packet work on one core, generator and sink on the other
        "split": Placement(
            "split",
            r,
            o,
            {("relay", "rin0"): r, ("sink", "sink0"): o, ("sink", "sdir0"): o},
        ),
        # no pinning, no steering: the scheduler and veth's in-context delivery decide
        "free": Placement("free", every, every, {}),
        # everything on one core
        "single": Placement(
            "single",
            o,
            o,
            {("relay", "rin0"): o, ("sink", "sink0"): o, ("sink", "sdir0"): o},
        ),
    }


@dataclasses.dataclass
class Topo:
    gen: Netns
    relay: Netns
    sink: Netns
    placement: Placement
    unroutable: bool
    tmp: Path


def _ethtool_no_uso(ns: Netns, ifname: str) -> None:
    """Cut GSO packets into frames in software at this device (like a NIC without USO)."""
    ns.run("ethtool", "-K", ifname, "tx-udp-segmentation", "off")


def _rps(ns: Netns, ifname: str, cpus: frozenset[int]) -> None:
    mask = format(sum(1 << c for c in cpus), "x")
    ns.run("sh", "-c", f"echo {mask} > /sys/class/net/{ifname}/queues/rx-0/rps_cpus")


@contextlib.contextmanager
def topology(placement: Placement, *, unroutable: bool = False) -> Iterator[Topo]:
    with namespaces("gen", "relay", "sink") as ns, tempfile.TemporaryDirectory() as tmp:
        gen, relay, sink = ns["gen"], ns["relay"], ns["sink"]
        in_addr = RELAY_IN_UNROUTABLE if unroutable else RELAY_IN_ADDR
        veth(gen, "gen0", f"{GEN_ADDR}/24", relay, "rin0", f"{in_addr}/24")
        veth(relay, "rout0", f"{RELAY_OUT_ADDR}/24", sink, "sink0", f"{SINK_ADDR}/24")
        veth(gen, "gdir0", "10.200.3.1/24", sink, "sdir0", "10.200.3.2/24")
        gen.ip("route", "add", "239.0.0.0/8", "dev", "gen0")
        sink.ip("route", "add", "239.0.0.0/8", "dev", "sink0")
        for n in (gen, relay, sink):  # no IPv6 chatter in the counts
            n.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        for n, ifname in ((gen, "gen0"), (gen, "gdir0"), (relay, "rout0")):
            _ethtool_no_uso(n, ifname)
        if unroutable:  # source on no connected subnet, no route back, strict RPF
            for key in ("all", "default", "rin0"):
                relay.sysctl(f"net.ipv4.conf.{key}.rp_filter", "1")
        roles = {"gen": gen, "relay": relay, "sink": sink}
        for (role, ifname), cpus in placement.rps.items():
            _rps(roles[role], ifname, cpus)
        yield Topo(gen, relay, sink, placement, unroutable, Path(tmp))


# ---------------------------------------------------------------- process helpers
