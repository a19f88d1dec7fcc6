"""parse_udp against frames built field by field: well-formed ones round-trip, broken ones map to
the right Drop, and no input at all makes it raise."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcrelay.dataplane.parse import Drop, inline_vlan, parse_udp
from tests.lab.frames import build_udp_frame, multicast_mac

addresses = st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
ports = st.integers(0, 0xFFFF)
tags = st.lists(
    st.one_of(
        st.integers(0, 0xFFFF),  # 802.1Q
        st.integers(0, 0xFFFF).map(lambda tci: 0x88A8 << 16 | tci),  # 802.1ad
        st.integers(0, 0xFFFF).map(lambda tci: 0x8100 << 16 | tci),
    ),
    max_size=1,  # a second tag is refused (test_stacked_tags_are_refused)
)
options = st.integers(0, 10).flatmap(
    lambda words: st.binary(min_size=4 * words, max_size=4 * words)
)


@st.composite
def frame_args(draw: st.DrawFn) -> dict[str, object]:
    return {
        "vlan_tags": draw(tags),
        "src": draw(addresses),
        "dst": draw(addresses),
        "sport": draw(ports),
        "dport": draw(ports),
        "payload": draw(st.binary(max_size=80)),
        "ttl": draw(st.integers(0, 255)),
        "ip_options": draw(options),
        "ident": draw(st.integers(0, 0xFFFF)),
        "flags_frag": draw(st.sampled_from([0, 0x4000, 0x8000])),  # none, DF, reserved bit
        "checksum": draw(st.booleans()),
    }


def build(args: dict[str, object], **override: object) -> bytes:
    return build_udp_frame(**{**args, **override})  # type: ignore[arg-type]


def expected(args: dict[str, object]) -> tuple[bytes, bytes]:
    dst = ipaddress.IPv4Address(args["dst"]).packed
    src = ipaddress.IPv4Address(args["src"]).packed
    return dst + struct.pack("!H", args["dport"]), src


def payload_of(frame: bytes | memoryview) -> bytes:
    result = parse_udp(frame)
    assert not isinstance(result, Drop), result
    _, _, start, end = result
    return bytes(frame[start:end])


@settings(max_examples=300)
@given(frame_args(), st.binary(max_size=40))
def test_well_formed_frames_round_trip(args: dict[str, object], padding: bytes) -> None:
    frame = build(args) + padding  # Ethernet padding (or trailing garbage) is never payload
    key, src = expected(args)
    for view in (frame, memoryview(bytearray(frame))):
        result = parse_udp(view)
        assert not isinstance(result, Drop), result
        got_key, got_src, start, end = result
        assert (got_key, got_src) == (key, src)
        assert type(got_key) is bytes
        assert type(got_src) is bytes
        assert bytes(view[start:end]) == args["payload"]


def test_short_frame_padding_is_not_payload() -> None:
    frame = build_udp_frame(
        src="10.0.0.1", dst="239.1.1.1", sport=1, dport=2, payload=b"x", pad_to=60
    )
    assert len(frame) == 60
    assert payload_of(frame) == b"x"


@settings(max_examples=50)
@given(frame_args(), st.integers(1, 30))
def test_udp_length_bounds_the_payload(args: dict[str, object], extra: int) -> None:
    """IP payload longer than the UDP datagram (IP-level padding): the UDP length wins."""
    body = len(args["ip_options"]) + 20 + 8 + len(args["payload"])  # type: ignore[arg-type]
    frame = build(args, total_length=body + extra) + b"\xaa" * extra
    assert payload_of(frame) == args["payload"]


@settings(max_examples=60)
@given(frame_args())
def test_every_truncation_is_truncated(args: dict[str, object]) -> None:
    frame = build(args)
    for cut in range(len(frame)):
        assert parse_udp(frame[:cut]) is Drop.TRUNCATED, cut


@settings(max_examples=100)
@given(
    frame_args(),
    st.one_of(
        st.integers(1, 0x1FFF),  # offset only: a later fragment
        st.integers(0, 0x1FFF).map(lambda offset: 0x2000 | offset),  # MF: more to come
    ),
    st.sampled_from([0, 0x4000]),
)
def test_fragments(args: dict[str, object], frag: int, df: int) -> None:
    assert parse_udp(build(args, flags_frag=frag | df)) is Drop.FRAGMENT


@settings(max_examples=50)
@given(frame_args(), st.integers(0, 255).filter(lambda p: p != 17))
def test_not_udp(args: dict[str, object], proto: int) -> None:
    assert parse_udp(build(args, proto=proto)) is Drop.NOT_UDP


@settings(max_examples=50)
@given(frame_args(), st.integers(0, 0xFFFF).filter(lambda t: t not in (0x0800, 0x8100, 0x88A8)))
def test_not_ipv4(args: dict[str, object], ethertype: int) -> None:
    assert parse_udp(build(args, ethertype=ethertype)) is Drop.NOT_IPV4


@settings(max_examples=50)
@given(frame_args(), st.integers(0, 4))
def test_ihl_below_five_is_malformed(args: dict[str, object], ihl: int) -> None:
    assert parse_udp(build(args, ihl=ihl)) is Drop.MALFORMED


@settings(max_examples=50)
@given(frame_args(), st.integers(0, 15).filter(lambda v: v != 4))
def test_version_not_four_is_malformed(args: dict[str, object], version: int) -> None:
    assert parse_udp(build(args, version=version)) is Drop.MALFORMED


BASE = {"src": "10.0.0.1", "dst": "239.1.2.3", "sport": 1000, "dport": 5000, "payload": b"12345678"}


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"total_length": 19}, Drop.MALFORMED),  # shorter than the IP header
        ({"total_length": 27, "payload": b""}, Drop.MALFORMED),  # no room for the UDP header
        ({"udp_length": 7}, Drop.MALFORMED),
        ({"udp_length": 0}, Drop.MALFORMED),
        ({"udp_length": 17}, Drop.TRUNCATED),  # beyond the IP datagram
        ({"total_length": 37}, Drop.TRUNCATED),  # beyond the frame
        ({"total_length": 0xFFFF}, Drop.TRUNCATED),
        ({"ihl": 6}, Drop.TRUNCATED),  # the UDP "header" ends past the datagram
        ({"ihl": 15}, Drop.MALFORMED),  # header longer than the datagram
        ({"ethertype": 0x86DD}, Drop.NOT_IPV4),
        ({"ethertype": 0x0806, "vlan_tags": [7]}, Drop.NOT_IPV4),
        ({"ethertype": 0x0806, "vlan_tags": [7, 8]}, Drop.VLAN),
        ({"proto": 6, "flags_frag": 0x2000}, Drop.FRAGMENT),  # fragment is checked first
    ],
)
def test_broken_headers(override: dict[str, object], reason: Drop) -> None:
    assert parse_udp(build(BASE, **override)) is reason


def test_empty_udp_payload() -> None:
    frame = build(BASE, payload=b"", pad_to=60)
    result = parse_udp(frame)
    assert not isinstance(result, Drop)
    assert result[2] == result[3]


def check_result(frame: bytes, result: tuple[bytes, bytes, int, int] | Drop) -> None:
    if isinstance(result, Drop):
        assert result is not Drop.OUTGOING
        return
    key, src, start, end = result
    assert (len(key), len(src)) == (6, 4)
    assert 14 + 20 + 8 <= start <= end <= len(frame)


@settings(max_examples=500)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_raise(frame: bytes) -> None:
    check_result(frame, parse_udp(frame))


@settings(max_examples=500)
@given(frame_args(), st.data())
def test_corrupted_frames_never_raise(args: dict[str, object], data: st.DataObject) -> None:
    """Random bytes rarely get past the ethertype; corrupting real frames reaches every check."""
    frame = bytearray(build(args))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    frame = frame[:cut]
    check_result(bytes(frame), parse_udp(bytes(frame)))
    check_result(bytes(frame), parse_udp(memoryview(frame)))


def test_labels_are_stable_and_distinct() -> None:
    assert {d: d.label for d in Drop} == {
        Drop.TRUNCATED: "truncated",
        Drop.MALFORMED: "malformed",
        Drop.NOT_IPV4: "not_ipv4",
        Drop.FRAGMENT: "fragment",
        Drop.NOT_UDP: "not_udp",
        Drop.OUTGOING: "outgoing",
        Drop.VLAN: "vlan",
    }


@pytest.mark.parametrize("depth", [2, 3, 8, 370])
@pytest.mark.parametrize("tpid", [0x8100, 0x88A8])
def test_stacked_tags_are_refused(depth: int, tpid: int) -> None:
    """However deep the stack, the second tag ends the parse."""
    frame = build(BASE, vlan_tags=[tpid << 16 | 100 + i for i in range(depth)])
    assert parse_udp(frame) is Drop.VLAN
    assert parse_udp(frame[:22]) is Drop.VLAN  # the rest of the stack never read


def test_an_inline_tag_after_a_stripped_one_is_refused() -> None:
    """`tagged`: the kernel already took the outer tag off; any tag left is a second one."""
    single = build(BASE, vlan_tags=[200])
    assert parse_udp(single, tagged=True) is Drop.VLAN
    assert not isinstance(parse_udp(build(BASE), tagged=True), Drop)


def test_inline_vlan_id() -> None:
    assert inline_vlan(build(BASE)) == 0
    assert inline_vlan(build(BASE, vlan_tags=[0xE000 | 200])) == 200  # priority bits ignored
    assert inline_vlan(build(BASE, vlan_tags=[0x88A8 << 16 | 7])) == 7
    assert inline_vlan(build(BASE, vlan_tags=[5])[:17]) == 0


def test_multicast_mac() -> None:
    assert multicast_mac("239.129.2.3") == bytes.fromhex("01005e010203")
    assert multicast_mac("224.0.0.1") == bytes.fromhex("01005e000001")
    with pytest.raises(ValueError, match="not an IPv4 multicast group"):
        multicast_mac("10.0.0.1")


def test_ipv4_header_checksum_verifies() -> None:
    from tests.lab.frames import internet_checksum

    frame = build(BASE, ip_options=b"\x01" * 8, vlan_tags=[5])
    header = frame[18 : 18 + 28]
    assert internet_checksum(header) == 0
    udp = frame[18 + 28 :]
    pseudo = header[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    assert internet_checksum(pseudo + udp) == 0
