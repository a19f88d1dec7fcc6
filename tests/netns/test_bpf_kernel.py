"""Generated filters attached by the real kernel to a real AF_PACKET socket on a veth.

Real: namespaces, veth, packet sockets, the kernel's BPF verifier and interpreter/JIT.
Each side is a child process (`ip netns exec`), because Python 3.11 has no os.setns. The receiver
attaches its filter before binding, so no frame escapes it; the sender pins itself to one CPU so
frames arrive in send order and an END frame marks the last one. Every wait has a deadline and
the namespaces go away with the `topology` context managers, also on failure.
"""

from __future__ import annotations

import ipaddress
import json
import random
import select
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.lab import topology
from tests.lab.frames import build_udp_frame

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and `ip netns`"),
]

RECEIVER = r"""
import json, socket, sys
from mcrelay.dataplane import bpf
from mcrelay.system.linux import ETH_P_ALL

ifname, pairs, outgoing = sys.argv[1], json.loads(sys.argv[2]), bytes.fromhex(sys.argv[3])
program = bpf.compile_filter([(addr, port) for addr, port in pairs], vlans=json.loads(sys.argv[4]))
rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing yet
bpf.attach(rx, bpf.drop_all())
bpf.attach(rx, program)  # replaces the first one
rx.bind((ifname, ETH_P_ALL))
tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
tx.bind((ifname, 0))
tx.send(outgoing)  # rx sees this as PACKET_OUTGOING
print(len(program), flush=True)
rx.settimeout(10)
got = []
while not got or b"#end#" not in got[-1]:
    got.append(rx.recv(65535))
rx.setblocking(False)
try:
    while True:
        got.append(rx.recv(65535))
except BlockingIOError:
    pass
print(json.dumps([frame.hex() for frame in got]), flush=True)
"""

SENDER = r"""
import os, socket, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU, one backlog: in order
tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
tx.bind((sys.argv[1], 0))
for frame in sys.argv[2:]:
    tx.send(bytes.fromhex(frame))
"""


def udp(dst: str, dport: int, name: str, **kw: Any) -> bytes:
    """A frame recognisable by its payload, `#name#`."""
    payload = f"#{name}#".encode()
    return build_udp_frame(
        src="10.200.1.1", dst=dst, sport=4000, dport=dport, payload=payload, **kw
    )


def frame_set(
    group: str, port: int, other_port: int, other_group: str, vlan100: bool = False
) -> dict[str, bytes]:
    """name → frame; names starting with '+' must reach the receiver. `vlan100`: a rule names
    VLAN 100."""
    vlan = "+vlan" if vlan100 else "-vlan"
    eth = bytes.fromhex("01005e010203") + bytes.fromhex("020000000001") + b"\x08\x00"
    return {
        "+match": udp(group, port, "+match"),
        "+padded": udp(group, port, "+padded", pad_to=60),
        "+options": udp(group, port, "+options", ip_options=b"\x01" * 8),
        "+fragment": udp(group, other_port, "+fragment", flags_frag=0x2000),
        "+tcp": udp(group, other_port, "+tcp", proto=6),
        "+short": eth + b"#+short#",  # no room for an IPv4 header
        # The kernel moves the outer tag into metadata before packet sockets see the frame:
        # the filter reads it with ancillary loads and filters the rest as IPv4.
        "+prio": udp(group, port, "+prio", vlan_tags=[0xA000]),  # priority only: untagged
        vlan: udp(group, port, vlan, vlan_tags=[0xE064]),  # VLAN 100, priority 7
        "-vlan200": udp(group, port, "-vlan200", vlan_tags=[200]),
        "-vlan-other-group": udp(other_group, port, "-vlan-other-group", vlan_tags=[100]),
        # more than one tag never passes, whatever the VLANs
        "-qinq": udp(group, port, "-qinq", vlan_tags=[0x88A80064, 100]),
        "-qq": udp(group, port, "-qq", vlan_tags=[100, 100]),
        "-stack8": udp(group, port, "-stack8", vlan_tags=[0x88A80064] + [100] * 7),
        "-other-port": udp(group, other_port, "-other-port"),
        "-other-group": udp(other_group, port, "-other-group"),
        "-unicast": udp("10.200.1.2", port, "-unicast"),
        "-ipv6": udp(group, port, "-ipv6", ethertype=0x86DD),
        "-arp": udp(group, port, "-arp", ethertype=0x0806),
    }


def received_names(
    pairs: list[tuple[str, int]],
    frames: dict[str, bytes],
    outgoing: bytes,
    vlans: tuple[int, ...] = (),
) -> set[str]:
    with topology.namespaces("tx", "rx") as ns:
        topology.veth(ns["tx"], "s0", None, ns["rx"], "r0", None)
        argv = ns["rx"].cmd(
            sys.executable,
            "-c",
            RECEIVER,
            "r0",
            json.dumps(pairs),
            outgoing.hex(),
            json.dumps(vlans),
        )
        receiver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert receiver.stdout is not None
            ready, _, _ = select.select([receiver.stdout], [], [], 20)
            assert ready, "receiver not ready"
            line = receiver.stdout.readline()
            assert line.strip().isdigit(), receiver.stderr and receiver.stderr.read()
            end = udp(*pairs[0], "end")
            hexed = [frame.hex() for frame in [*frames.values(), end]]
            ns["tx"].run(sys.executable, "-c", SENDER, "s0", *hexed)
            out, err = receiver.communicate(timeout=20)
            assert receiver.returncode == 0, err
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
    got = [bytes.fromhex(h) for h in json.loads(out)]
    markers = {f"#{name}#".encode(): name for name in [*frames, "end", "outgoing"]}
    names = {name for marker, name in markers.items() for frame in got if marker in frame}
    stray = [frame.hex() for frame in got if not any(marker in frame for marker in markers)]
    assert not stray, f"frames the filter should have dropped: {stray}"
    return names


def random_groups(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [str(ipaddress.IPv4Address(a)) for a in rng.sample(range(0xEF000000, 0xF0000000), n)]


def one_pair() -> list[tuple[str, int]]:
    return [("239.1.2.3", 5000)]


def thousand_groups() -> list[tuple[str, int]]:
    rng = random.Random(1)
    return [(g, rng.randrange(1, 0x10000)) for g in random_groups(1000, seed=1)]


def fifty_by_twenty() -> list[tuple[str, int]]:
    rng = random.Random(2)
    return [(g, rng.randrange(1, 0x10000)) for g in random_groups(50, seed=2) for _ in range(20)]


@pytest.mark.parametrize("vlans", [(), (100,), tuple(range(50, 150))])
@pytest.mark.parametrize("make", [one_pair, thousand_groups, fifty_by_twenty])
def test_kernel_runs_the_filter(
    make: Callable[[], list[tuple[str, int]]], vlans: tuple[int, ...]
) -> None:
    pairs = make()
    group, port = pairs[0]
    ports = {p for g, p in pairs if g == group}
    other_port = next(p for p in range(5001, 0x10000) if p not in ports)
    configured = {g for g, _ in pairs}
    other_group = next(g for g in random_groups(2000, seed=7) if g not in configured)
    frames = frame_set(group, port, other_port, other_group, vlan100=100 in vlans)
    outgoing = udp(group, port, "outgoing")
    names = received_names(pairs, frames, outgoing, vlans)
    assert names == {name for name in frames if name.startswith("+")} | {"end"}
