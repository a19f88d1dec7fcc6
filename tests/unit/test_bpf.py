"""Generated socket filters, run by a small classic-BPF interpreter that behaves like the kernel's
(an out-of-bounds load ends the program with 0), against frames built by `frames`.

The spec (`spec_accepts`) restates the rules of `compile_filter`; exact programs must agree with
it on every frame, looser fallbacks must accept at least what it accepts.
"""

from __future__ import annotations

import ipaddress
import operator
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcrelay.dataplane import bpf
from mcrelay.dataplane.bpf import (
    ACCEPT,
    BPF_A,
    BPF_ABS,
    BPF_ALU,
    BPF_IMM,
    BPF_IND,
    BPF_JMP,
    BPF_LD,
    BPF_LDX,
    BPF_LEN,
    BPF_MAXINSNS,
    BPF_MEM,
    BPF_MISC,
    BPF_MSH,
    BPF_RET,
    BPF_ST,
    BPF_STX,
    BPF_X,
    Instruction,
    compile_filter,
    drop_all,
)
from mcrelay.dataplane.parse import Drop, inline_vlan, parse_udp
from mcrelay.system.linux import PACKET_HOST, PACKET_MULTICAST, PACKET_OUTGOING
from tests.lab.frames import build_udp_frame

U32 = 0xFFFFFFFF
_SIZES = {0x00: 4, 0x08: 2, 0x10: 1}
_ALU = {
    0x00: operator.add,
    0x10: operator.sub,
    0x20: operator.mul,
    0x30: operator.floordiv,
    0x40: operator.or_,
    0x50: operator.and_,
    0x60: operator.lshift,
    0x70: operator.rshift,
    0x90: operator.mod,
    0xA0: operator.xor,
}


_TAGS = (b"\x81\x00", b"\x88\xa8")


def run(
    program: list[Instruction],
    frame: bytes,
    pkttype: int = PACKET_MULTICAST,
    tci: int | None = None,
) -> int:
    """Classic BPF as the kernel runs it on a SOCK_RAW packet socket; `tci` is the outer tag
    the kernel moved out of the frame (skb_vlan_untag), None for a frame without one."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    n = len(frame)
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls == BPF_LD:
            mode = code & 0xE0
            if mode in (BPF_ABS, BPF_IND):
                if mode == BPF_ABS and k >= (bpf.SKF_AD_OFF & U32):
                    a = {
                        bpf.SKF_AD_PKTTYPE: pkttype,
                        bpf.SKF_AD_VLAN_TAG: tci or 0,
                        bpf.SKF_AD_VLAN_TAG_PRESENT: int(tci is not None),
                    }[k - (bpf.SKF_AD_OFF & U32)]
                    continue
                offset = k if mode == BPF_ABS else (x + k) & U32
                size = _SIZES[code & 0x18]
                if offset + size > n:
                    return 0
                a = int.from_bytes(frame[offset : offset + size], "big")
            elif mode == BPF_IMM:
                a = k
            elif mode == BPF_LEN:
                a = n
            elif mode == BPF_MEM:
                a = mem[k]
            else:
                raise AssertionError(f"bad ld {code:#x}")
        elif cls == BPF_LDX:
            mode = code & 0xE0
            if mode == BPF_IMM:
                x = k
            elif mode == BPF_LEN:
                x = n
            elif mode == BPF_MEM:
                x = mem[k]
            elif mode == BPF_MSH:
                if k >= n:
                    return 0
                x = (frame[k] & 0x0F) * 4
            else:
                raise AssertionError(f"bad ldx {code:#x}")
        elif cls == BPF_ST:
            mem[k] = a
        elif cls == BPF_STX:
            mem[k] = x
        elif cls == BPF_ALU:
            operand = x if code & BPF_X else k
            op = code & 0xF0
            if op in (0x30, 0x90) and operand == 0:  # div, mod by zero
                return 0
            a = -a & U32 if op == 0x80 else _ALU[op](a, operand) & U32
        elif cls == BPF_JMP:
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            operand = x if code & BPF_X else k
            taken = {
                0x10: a == operand,
                0x20: a > operand,
                0x30: a >= operand,
                0x40: bool(a & operand),
            }[op]
            pc += jt if taken else jf
        elif cls == BPF_RET:
            return a if code & 0x18 == BPF_A else k
        elif cls == BPF_MISC:
            if code & 0xF8 == 0x00:
                x = a
            elif code & 0xF8 == 0x80:
                a = x
            else:
                raise AssertionError(f"bad misc {code:#x}")


def check_program(program: list[Instruction]) -> None:
    """What the kernel's bpf_check_classic insists on, for the opcodes we emit."""
    assert 1 <= len(program) <= BPF_MAXINSNS
    for pc, (code, jt, jf, k) in enumerate(program):
        assert 0 <= code <= 0xFFFF
        assert 0 <= k <= U32
        assert 0 <= jt <= 255
        assert 0 <= jf <= 255
        if code == BPF_JMP:  # ja
            assert pc + 1 + k < len(program)
        elif code & 0x07 == BPF_JMP:
            assert pc + 1 + max(jt, jf) < len(program)
    assert program[-1][0] & 0x07 == BPF_RET


def spec_accepts(
    frame: bytes,
    pkttype: int,
    table: dict[bytes, set[int]],
    vlans: frozenset[int] = frozenset(),
    tci: int | None = None,
) -> bool:
    """compile_filter's rules, written down plainly."""
    if pkttype == PACKET_OUTGOING:
        return False
    if len(frame) < 14:
        return True
    ethertype = frame[12:14]
    if tci is not None:
        if ethertype in _TAGS or tci & 0xFFF not in vlans | {0}:
            return False  # a second tag, or another VLAN
    elif ethertype in _TAGS:
        if len(frame) < 18:
            return True
        if frame[16:18] in _TAGS:
            return False
        return inline_vlan(frame) in vlans | {0}
    if ethertype != b"\x08\x00":
        return False
    if len(frame) < 34:
        return True
    dst = frame[30:34]
    if dst not in table:
        return False
    ihl = (frame[14] & 0x0F) * 4
    if (
        struct.unpack_from("!H", frame, 20)[0] & 0x3FFF
        or frame[23] != 17
        or frame[14] >> 4 != 4
        or ihl < 20
        or len(frame) < 14 + ihl + 8
    ):
        return True
    return struct.unpack_from("!H", frame, 14 + ihl + 2)[0] in table[dst]


def table_of(pairs: list[tuple[str, int]]) -> dict[bytes, set[int]]:
    table: dict[bytes, set[int]] = {}
    for addr, port in pairs:
        table.setdefault(ipaddress.IPv4Address(addr).packed, set()).add(port)
    return table


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


# ---- properties on small configurations, where collisions are likely ---------------------------

POOL_GROUPS = ["239.0.0.1", "239.0.0.2", "239.0.1.1", "224.0.0.251", "10.200.1.2", "0.0.0.0",
               "255.255.255.255", "239.255.255.255"]  # fmt: skip
POOL_PORTS = [0, 1, 53, 5000, 5001, 0xFFFF]

POOL_VLANS = [1, 7, 200, 4094]
POOL_TAGS = [0, 7, 0xE007, 200, 300, 0x88A80000 | 200, 0x88A80000 | 300]
vlan_sets = st.frozensets(st.sampled_from(POOL_VLANS), max_size=3)
tcis = st.one_of(st.none(), st.sampled_from([0, 7, 0x2007, 200, 300, 4094]))

configs = st.lists(
    st.tuples(st.sampled_from(POOL_GROUPS), st.sampled_from(POOL_PORTS)), min_size=1, max_size=12
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """Mostly frames near the configured space, with every field the filter reads varied."""
    frame = build_udp_frame(
        src="10.200.1.1",
        dst=draw(st.sampled_from(POOL_GROUPS)),
        sport=draw(st.sampled_from(POOL_PORTS)),
        dport=draw(st.sampled_from(POOL_PORTS)),
        payload=(payload := draw(st.binary(max_size=12))),
        vlan_tags=draw(st.lists(st.sampled_from(POOL_TAGS), max_size=3)),
        ip_options=draw(st.sampled_from([b"", b"\1" * 4, b"\1" * 40])),
        flags_frag=draw(st.sampled_from([0, 0x4000, 0x2000, 0x0001, 0x8000])),
        proto=draw(st.sampled_from([17, 17, 17, 6, 1])),
        ethertype=draw(st.sampled_from([0x0800] * 6 + [0x86DD, 0x0806, 0x88A8])),
        version=draw(st.sampled_from([4] * 6 + [0, 5, 6])),
        ihl=draw(st.sampled_from([None] * 6 + [0, 4, 15])),
    )
    headers_end = len(frame) - len(payload)
    cut = draw(
        st.one_of(
            st.just(len(frame)),
            st.integers(0, len(frame)),
            st.integers(max(0, headers_end - 12), headers_end),  # inside the UDP header
        )
    )
    return frame[:cut]


pkttypes = st.sampled_from([PACKET_HOST, PACKET_MULTICAST, 3, PACKET_OUTGOING])


@settings(max_examples=400, deadline=None)
@given(configs, frames(), pkttypes, vlan_sets, tcis)
def test_exact_program_matches_spec(
    pairs: list[tuple[str, int]],
    frame: bytes,
    pkttype: int,
    vlans: frozenset[int],
    tci: int | None,
) -> None:
    program = compile_filter(pairs, vlans=vlans)
    check_program(program)
    table = table_of(pairs)
    expected = spec_accepts(frame, pkttype, table, vlans, tci)
    assert run(program, frame, pkttype, tci) == (ACCEPT if expected else 0)


@settings(max_examples=200, deadline=None)
@given(configs, st.binary(max_size=80), pkttypes)
def test_arbitrary_bytes_match_spec(
    pairs: list[tuple[str, int]], frame: bytes, pkttype: int
) -> None:
    program = compile_filter(pairs)
    expected = ACCEPT if spec_accepts(frame, pkttype, table_of(pairs)) else 0
    assert run(program, frame, pkttype) == expected


@settings(max_examples=300, deadline=None)
@given(configs, frames(), pkttypes, st.integers(1, 60), vlan_sets, tcis)
def test_squeezed_programs_accept_a_superset(
    pairs: list[tuple[str, int]],
    frame: bytes,
    pkttype: int,
    max_insns: int,
    vlans: frozenset[int],
    tci: int | None,
) -> None:
    program = compile_filter(pairs, vlans=vlans, max_insns=max_insns)
    check_program(program)
    got = run(program, frame, pkttype, tci)
    assert got in (0, ACCEPT)
    if spec_accepts(frame, pkttype, table_of(pairs), vlans, tci):
        assert got == ACCEPT
    if pkttype == PACKET_OUTGOING or (len(frame) >= 14 and frame[12:14] == b"\x86\xdd"):
        assert got == 0
    if stacked(frame, tci):
        assert got == 0


def stacked(frame: bytes, tci: int | None) -> bool:
    """More than one VLAN tag, counting the one the kernel moved out of the frame."""
    if len(frame) < 14 or frame[12:14] not in _TAGS:
        return False
    return tci is not None or (len(frame) >= 18 and frame[16:18] in _TAGS)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(POOL_GROUPS),
            st.sampled_from(POOL_PORTS),
            st.one_of(st.none(), st.sampled_from(POOL_VLANS)),
        ),
        min_size=1,
        max_size=12,
    ),
    frames(),
    pkttypes,
    tcis,
)
def test_filter_never_hides_a_frame_userspace_would_relay(
    inputs: list[tuple[str, int, int | None]], frame: bytes, pkttype: int, tci: int | None
) -> None:
    """As the data worker matches: the frame's VLAN id (0: untagged) is part of the input."""
    result = parse_udp(frame, tagged=tci is not None)
    if pkttype == PACKET_OUTGOING or isinstance(result, Drop):
        return
    key = result[0]
    vid = tci & 0xFFF if tci is not None else inline_vlan(frame)
    wanted = {(ipaddress.IPv4Address(a).packed, p, v or 0) for a, p, v in inputs}
    if (key[:4], int.from_bytes(key[4:], "big"), vid) in wanted:
        program = compile_filter(
            [(a, p) for a, p, _ in inputs], vlans={v for _, _, v in inputs if v is not None}
        )
        assert run(program, frame, pkttype, tci) == ACCEPT


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
