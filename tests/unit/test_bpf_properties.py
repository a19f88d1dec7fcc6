"""Properties of generated socket filters on small configurations, where collisions are likely:
hypothesis varies every field the filter reads, and the interpreter in `tests.unit.bpf_vm` runs
the program against its `spec_accepts` and against what the data worker would relay.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from mcrelay.dataplane.bpf import ACCEPT, compile_filter
from mcrelay.dataplane.parse import Drop, inline_vlan, parse_udp
from mcrelay.system.linux import PACKET_HOST, PACKET_MULTICAST, PACKET_OUTGOING
from tests.lab.frames import build_udp_frame
from tests.unit.bpf_vm import TAGS, check_program, run, spec_accepts, table_of

# ---- properties on small configurations, where collisions are likely ---------------------------

POOL_GROUPS = ["239.0.0.1", "239.0.0.2", "239.0.1.1", "224.0.0.251", "10.200.1.2", "0.0.0.0",
               "255.255.255.255", "239.255.255.255"]  # fmt: skip
POOL_PORTS = [0, 1, 53, 5000, 5001, 0xFFFF]

POOL_VLANS = [1, 7, 200, 4094]
POOLTAGS = [0, 7, 0xE007, 200, 300, 0x88A80000 | 200, 0x88A80000 | 300]
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
        vlan_tags=draw(st.lists(st.sampled_from(POOLTAGS), max_size=3)),
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
    if len(frame) < 14 or frame[12:14] not in TAGS:
        return False
    return tci is not None or (len(frame) >= 18 and frame[16:18] in TAGS)


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
