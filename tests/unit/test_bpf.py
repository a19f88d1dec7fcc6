"""Generated socket filters on chosen frames and configurations, run by the interpreter in
`tests.unit.bpf_vm` against frames built by `frames`; exact programs must agree with its
`spec_accepts`, looser fallbacks must accept at least what it accepts.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from typing import Any

import pytest

from mcrelay.dataplane.bpf import ACCEPT, compile_filter, drop_all
from mcrelay.dataplane.bpf_asm import BPF_JMP, BPF_MAXINSNS
from mcrelay.system.linux import PACKET_HOST, PACKET_MULTICAST, PACKET_OUTGOING
from tests.lab.frames import build_udp_frame
from tests.unit.bpf_vm import check_program, run, spec_accepts, table_of


def udp(dst: str, dport: int, **kw: Any) -> bytes:
    return build_udp_frame(src="10.200.1.1", dst=dst, sport=4000, dport=dport, payload=b"hi", **kw)


G, P = "239.1.2.3", 5000
ONE = compile_filter([(G, P)])


@pytest.mark.parametrize(
    ("frame", "pkttype", "accepted"),
    [
        pytest.param(udp(G, P), PACKET_MULTICAST, True, id="match"),
        pytest.param(udp(G, P, pad_to=60), PACKET_MULTICAST, True, id="match-padded"),
        pytest.param(
            udp(G, P, ip_options=b"\x01" * 40), PACKET_MULTICAST, True, id="match-options"
        ),
        pytest.param(udp(G, P), PACKET_HOST, True, id="match-host"),
        pytest.param(udp(G, P), PACKET_OUTGOING, False, id="outgoing"),
        pytest.param(udp(G, P + 1), PACKET_MULTICAST, False, id="other-port"),
        pytest.param(udp("239.1.2.4", P), PACKET_MULTICAST, False, id="other-group"),
        pytest.param(udp("10.200.1.2", P), PACKET_HOST, False, id="unicast"),
        pytest.param(udp(G, P + 1, flags_frag=0x2000), PACKET_MULTICAST, True, id="first-fragment"),
        pytest.param(udp(G, P + 1, flags_frag=0x0010), PACKET_MULTICAST, True, id="later-fragment"),
        pytest.param(udp(G, P + 1, flags_frag=0x4000), PACKET_MULTICAST, False, id="df-other-port"),
        pytest.param(
            udp("239.1.2.4", P, flags_frag=0x2000), PACKET_MULTICAST, False, id="frag-other"
        ),
        pytest.param(udp(G, P + 1, proto=6), PACKET_MULTICAST, True, id="tcp-to-group"),
        pytest.param(udp(G, P + 1, ihl=4), PACKET_MULTICAST, True, id="bad-ihl"),
        pytest.param(udp(G, P + 1, version=6), PACKET_MULTICAST, True, id="bad-version"),
        pytest.param(udp(G, P, ethertype=0x0806), PACKET_MULTICAST, False, id="arp"),
        pytest.param(udp(G, P, ethertype=0x86DD), PACKET_MULTICAST, False, id="ipv6"),
        pytest.param(udp("239.9.9.9", 1, vlan_tags=[7]), PACKET_MULTICAST, False, id="8021q"),
        pytest.param(udp("239.9.9.9", 1, vlan_tags=[0]), PACKET_MULTICAST, True, id="prio-tag"),
        pytest.param(
            udp("239.9.9.9", 1, vlan_tags=[0x88A80007]), PACKET_MULTICAST, False, id="8021ad"
        ),
        pytest.param(udp(G, P, vlan_tags=[0, 0]), PACKET_MULTICAST, False, id="two-inline"),
        pytest.param(udp(G, P)[:13], PACKET_MULTICAST, True, id="shorter-than-ethernet"),
        pytest.param(udp(G, P)[:33], PACKET_MULTICAST, True, id="shorter-than-ipv4"),
        pytest.param(udp(G, P)[:41], PACKET_MULTICAST, True, id="shorter-than-udp"),
        pytest.param(udp(G, P + 1)[:41], PACKET_MULTICAST, True, id="short-udp-other-port"),
        pytest.param(udp(G, P + 1)[:38], PACKET_MULTICAST, True, id="short-udp-port-only"),
        pytest.param(udp("239.1.2.4", P)[:41], PACKET_MULTICAST, False, id="short-udp-other"),
        pytest.param(
            udp(G, P, ip_options=b"\1" * 40)[:80], PACKET_MULTICAST, True, id="short-opts"
        ),
        pytest.param(udp(G, P, ip_options=b"\1" * 40)[:40], PACKET_MULTICAST, True, id="ihl>len"),
        pytest.param(udp(G, P)[:13], PACKET_OUTGOING, False, id="short-outgoing"),
    ],
)
def test_one_pair(frame: bytes, pkttype: int, accepted: bool) -> None:
    check_program(ONE)
    assert run(ONE, frame, pkttype) == (ACCEPT if accepted else 0)
    assert spec_accepts(frame, pkttype, table_of([(G, P)])) == accepted


def test_no_pairs_drop_everything() -> None:
    program = compile_filter([])
    assert program == drop_all()
    for frame in (udp(G, P), b"", udp(G, P)[:20], udp(G, P, vlan_tags=[1])):
        assert run(program, frame) == 0


def groups(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [str(ipaddress.IPv4Address(a)) for a in rng.sample(range(0xEF000000, 0xF0000000), n)]


def pairs_1000_distinct_ports() -> list[tuple[str, int]]:
    rng = random.Random(1)
    return [(g, rng.randrange(1, 0x10000)) for g in groups(1000)]


def pairs_1000_same_port() -> list[tuple[str, int]]:
    return [(g, 5000) for g in groups(1000)]


def pairs_50x20() -> list[tuple[str, int]]:
    rng = random.Random(2)
    return [(g, rng.randrange(1, 0x10000)) for g in groups(50) for _ in range(20)]


def pairs_50x20_same_ports() -> list[tuple[str, int]]:
    return [(g, 6000 + i) for g in groups(50) for i in range(20)]


def pairs_big_mixed() -> list[tuple[str, int]]:
    rng = random.Random(3)
    return [(g, rng.choice([5000, 5001, rng.randrange(1, 0x10000)])) for g in groups(800)] + [
        (g, 7000 + i) for g in groups(40, seed=9) for i in range(rng.randrange(1, 60))
    ]


@pytest.mark.parametrize(
    "make",
    [pairs_1000_distinct_ports, pairs_1000_same_port, pairs_50x20, pairs_50x20_same_ports,
     pairs_big_mixed],
)  # fmt: skip
def test_large_configurations_are_exact(make: Callable[[], list[tuple[str, int]]]) -> None:
    pairs = make()
    table = table_of(pairs)
    program = compile_filter(pairs)
    check_program(program)
    rng = random.Random(4)
    for addr, port in rng.sample(pairs, 200):
        assert run(program, udp(addr, port)) == ACCEPT
        other = rng.randrange(0x10000)
        accepted = other in table[ipaddress.IPv4Address(addr).packed]
        assert run(program, udp(addr, other)) == (ACCEPT if accepted else 0)
        assert run(program, udp(addr, other, flags_frag=0x2000)) == ACCEPT
        assert run(program, udp(addr, port), PACKET_OUTGOING) == 0
    configured = set(table)
    for addr in groups(300, seed=99):
        if ipaddress.IPv4Address(addr).packed not in configured:
            assert run(program, udp(addr, pairs[0][1])) == 0


@pytest.mark.parametrize(
    ("n_groups", "max_insns"),
    [(1500, BPF_MAXINSNS), (5000, BPF_MAXINSNS), (200, 300), (200, 100), (50, 30)],
)
def test_fallbacks_accept_a_superset(n_groups: int, max_insns: int) -> None:
    rng = random.Random(n_groups)
    pairs = [(g, rng.randrange(1, 0x10000)) for g in groups(n_groups)]
    program = compile_filter(pairs, max_insns=max_insns)
    assert len(program) <= max_insns or len(program) < 16  # the IPv4-only floor always fits
    check_program(program)
    for addr, port in rng.sample(pairs, min(100, len(pairs))):
        assert run(program, udp(addr, port)) == ACCEPT
        assert run(program, udp(addr, port + 1, proto=17, flags_frag=0x2000)) == ACCEPT
        assert run(program, udp(addr, port), PACKET_OUTGOING) == 0
        assert run(program, udp(addr, port, ethertype=0x86DD)) == 0


@pytest.mark.parametrize("depth", [1, 2, 8])
@pytest.mark.parametrize("vlans", [frozenset(), frozenset({100})])
def test_stacked_tags_never_pass(depth: int, vlans: frozenset[int]) -> None:
    """However the tags are split between metadata and bytes, two or more never pass."""
    program = compile_filter([(G, P)], vlans=vlans)
    for tpid in (0x8100, 0x88A8):
        inline = [tpid << 16 | 100] * depth
        assert run(program, udp(G, P, vlan_tags=inline), tci=100) == 0  # outer one moved
        if depth > 1:
            assert run(program, udp(G, P, vlan_tags=inline)) == 0  # all inline


@pytest.mark.parametrize(
    ("vlans", "tci", "accepted"),
    [
        (frozenset(), None, True),
        (frozenset(), 200, False),
        (frozenset(), 0x6000, True),  # priority only: untagged
        (frozenset({200}), 200, True),
        (frozenset({200}), 0xE000 | 200, True),  # priority bits ignored
        (frozenset({200}), 201, False),
        (frozenset({200}), None, True),
        (frozenset(range(1, 60)), 59, True),  # a VLAN search tree
        (frozenset(range(1, 60)), 60, False),
    ],
)
def test_stripped_tag(vlans: frozenset[int], tci: int | None, accepted: bool) -> None:
    program = compile_filter([(G, P)], vlans=vlans)
    check_program(program)
    assert run(program, udp(G, P), tci=tci) == (ACCEPT if accepted else 0)
    assert run(program, udp(G, P + 1), tci=tci) == 0


def test_bad_vlan_rejected() -> None:
    with pytest.raises(ValueError, match="VLAN"):
        compile_filter([(G, P)], vlans=[4095])


def test_large_program_jumps_use_trampolines() -> None:
    """A port set too long for 8-bit jumps still works (the assembler adds `ja`s/`ret`s)."""
    ports = list(range(1, 1200, 2))
    program = compile_filter([(G, p) for p in ports])
    check_program(program)
    assert any(code == BPF_JMP and k > 255 for code, _, _, k in program)
    for port in range(0, 1202):
        assert run(program, udp(G, port)) == (ACCEPT if port in ports else 0)


def test_bad_port_rejected() -> None:
    with pytest.raises(ValueError, match="port"):
        compile_filter([(G, 70000)])
    with pytest.raises(ValueError, match="octets"):
        compile_filter([("::1", 1)])
