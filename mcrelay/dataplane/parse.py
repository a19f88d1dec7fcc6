"""Find the UDP payload in a captured Ethernet frame, or say why there is none.

This runs once per captured frame, so it is one flat function: no objects are built except the
returned key and source slices, and every field is read with precompiled `struct` unpackers
(measured faster than byte indexing, for `bytes` and `memoryview` alike). It trusts no length
field: each one is checked against the bytes actually captured. Checksums are not verified: the
kernel does not verify them for packet sockets either, and the relay forwards what it saw.
"""

from __future__ import annotations

import enum
import struct

from mcrelay.ipc.vocabulary import DropReason


class Drop(enum.IntEnum):
    """Why the parser refused a frame, as a small int for the hot path; `.label` is the
    reason's stable stats key (`DropReason`)."""

    TRUNCATED = 1  # a header or length field claims bytes the frame does not have
    MALFORMED = 2  # impossible header values: version, IHL, lengths too small
    NOT_IPV4 = 3  # ethertype after any VLAN tags is not IPv4
    FRAGMENT = 4  # MF set or fragment offset != 0: the relay forwards whole datagrams only
    NOT_UDP = 5
    OUTGOING = 6  # sent by this host; set by the caller from sockaddr_ll pkttype, never here
    VLAN = 7  # more than one VLAN tag: never relayed

    @property
    def label(self) -> DropReason:
        return DropReason[self.name]


#: Drops the relay counts after parsing: no rule for the destination, no rule for the sender.
NO_RULE = DropReason.NO_RULE
SOURCE_FILTERED = DropReason.SOURCE_FILTERED
#: Every drop reason a data worker counts.
DROP_REASONS = tuple(DropReason)

ETH_HLEN = 14

_ethertype = struct.Struct("!H").unpack_from
# version/IHL, total length, flags/fragment offset, protocol, source, destination
_ipv4 = struct.Struct("!BxH2xHxB2x4s4s").unpack_from
# destination port (kept as bytes: it becomes part of the key), length
_udp = struct.Struct("!2x2sH").unpack_from

_TRUNCATED = Drop.TRUNCATED
_MALFORMED = Drop.MALFORMED
_NOT_IPV4 = Drop.NOT_IPV4
_FRAGMENT = Drop.FRAGMENT
_NOT_UDP = Drop.NOT_UDP
_VLAN = Drop.VLAN
VID_MASK = 0x0FFF
_TPIDS = (0x8100, 0x88A8)


def inline_vlan(frame: bytes | memoryview) -> int:
    """The VLAN id of the frame's inline tag, 0 without one (or with a priority-only tag)."""
    if len(frame) >= ETH_HLEN + 4 and _ethertype(frame, 12)[0] in _TPIDS:
        return int(_ethertype(frame, 14)[0]) & VID_MASK
    return 0


def parse_udp(
    frame: bytes | memoryview, *, tagged: bool = False
) -> tuple[bytes, bytes, int, int] | Drop:
    """Return `(key, src, start, end)` for a UDP-in-IPv4 frame, else the reason to drop it.

    `key` is destination address + destination port (6 bytes, network order), the rule lookup
    key; `src` the 4-byte source address; `frame[start:end]` the payload. Inline 802.1Q/802.1ad
    tags are skipped, any number of them. The payload ends where the UDP length says, so Ethernet
    padding of short frames is never relayed. Checks run in header order and the first failure
    wins, so a fragment or a non-UDP datagram is reported as such before its UDP header is read.
    """
    n = len(frame)
    if n < ETH_HLEN:
        return _TRUNCATED
    (ethertype,) = _ethertype(frame, 12)
    ip = ETH_HLEN
    if ethertype == 0x8100 or ethertype == 0x88A8:
        if tagged:
            return _VLAN
        ip += 4
        if n < ip:
            return _TRUNCATED
        (ethertype,) = _ethertype(frame, ip - 2)
        if ethertype == 0x8100 or ethertype == 0x88A8:
            return _VLAN
    if ethertype != 0x0800:
        return _NOT_IPV4
    if n < ip + 20:
        return _TRUNCATED
    vihl, total, flags_frag, proto, src, dst = _ipv4(frame, ip)
    hlen = (vihl & 0x0F) << 2
    if vihl & 0xF0 != 0x40 or hlen < 20 or total < hlen:
        return _MALFORMED
    if total > n - ip:
        return _TRUNCATED
    if flags_frag & 0x3FFF:  # MF or a fragment offset; DF and the reserved bit don't matter
        return _FRAGMENT
    if proto != 17:
        return _NOT_UDP
    udp_max = total - hlen  # the UDP datagram may be shorter than the IP payload, never longer
    if udp_max < 8:
        return _MALFORMED
    udp = ip + hlen
    dport, ulen = _udp(frame, udp)
    if ulen < 8:
        return _MALFORMED
    if ulen > udp_max:
        return _TRUNCATED
    return dst + dport, src, udp + 8, udp + ulen
