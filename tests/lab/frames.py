"""Build Ethernet/VLAN/IPv4/UDP frames for tests and lab tools (mcrelay itself never builds any).

Every field a parser or a socket filter has to survive can be set, so the same builder makes both
well-formed frames and garbage: VLAN stacks, IPv4 options, fragments, other protocols, lying
length fields and bad checksums.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
IPPROTO_UDP = 17

BROADCAST_MAC = b"\xff" * 6
DEFAULT_SRC_MAC = bytes.fromhex("020000000001")  # locally administered, unicast
ETH_MIN_FRAME = 60  # without FCS: shorter frames get padded on the wire

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


def multicast_mac(group: str) -> bytes:
    """The Ethernet address an IPv4 group maps to: 01:00:5e + the low 23 bits (RFC 1112)."""
    addr = ipaddress.IPv4Address(group)
    if not addr.is_multicast:
        raise ValueError(f"{group} is not an IPv4 multicast group")
    return b"\x01\x00\x5e" + (int(addr) & 0x7FFFFF).to_bytes(3, "big")


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement sum, as used by the IPv4 header and UDP."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def vlan_tag(tag: int) -> bytes:
    """A 4-byte tag: a 16-bit value is a TCI under TPID 0x8100, a wider one is TPID<<16 | TCI."""
    if not 0 <= tag <= 0xFFFFFFFF:
        raise ValueError(f"VLAN tag out of range: {tag:#x}")
    if tag <= 0xFFFF:
        tag |= ETH_P_8021Q << 16
    return tag.to_bytes(4, "big")


def build_udp_frame(
    *,
    dst_mac: bytes | None = None,
    src_mac: bytes = DEFAULT_SRC_MAC,
    vlan_tags: Sequence[int] = (),
    src: str,
    dst: str,
    sport: int,
    dport: int,
    payload: bytes,
    ttl: int = 64,
    ip_options: bytes = b"",
    ident: int = 0,
    flags_frag: int = 0,
    checksum: bool = True,
    proto: int = IPPROTO_UDP,
    ethertype: int = ETH_P_IP,
    version: int = 4,
    ihl: int | None = None,
    total_length: int | None = None,
    udp_length: int | None = None,
    pad_to: int = 0,
) -> bytes:
    """One Ethernet frame carrying `payload` in UDP over IPv4.

    `dst_mac` defaults to the group's multicast MAC (broadcast for a unicast `dst`). `vlan_tags`
    are outermost first (see `vlan_tag`). `flags_frag` is the raw flags + fragment offset field
    (0x2000 = MF). `checksum=False` leaves both checksums 0. `proto`, `ethertype`, `version`, `ihl`
    (in 32-bit words), `total_length` and `udp_length` override the computed values to make
    malformed frames; `pad_to` appends zeros up to that frame length, as Ethernet does (60).
    """
    if ihl is None:
        if len(ip_options) % 4 or len(ip_options) > 40:
            raise ValueError("IPv4 options must be a multiple of 4 bytes, at most 40")
        ihl = 5 + len(ip_options) // 4
    ulen = 8 + len(payload) if udp_length is None else udp_length
    ip_header_len = 20 + len(ip_options)
    total = ip_header_len + 8 + len(payload) if total_length is None else total_length
    saddr = ipaddress.IPv4Address(src).packed
    daddr = ipaddress.IPv4Address(dst).packed

    udp_sum = 0
    if checksum:
        pseudo = saddr + daddr + struct.pack("!BBH", 0, proto, ulen)
        udp_sum = internet_checksum(pseudo + _UDP.pack(sport, dport, ulen, 0) + payload) or 0xFFFF
    udp = _UDP.pack(sport, dport, ulen, udp_sum) + payload

    fields = [version << 4 | ihl, 0, total, ident, flags_frag, ttl, proto, 0, saddr, daddr]
    header = _IPV4.pack(*fields) + ip_options
    if checksum:
        fields[7] = internet_checksum(header)
        header = _IPV4.pack(*fields) + ip_options

    if dst_mac is None:
        is_group = ipaddress.IPv4Address(dst).is_multicast
        dst_mac = multicast_mac(dst) if is_group else BROADCAST_MAC
    tags = b"".join(vlan_tag(t) for t in vlan_tags)
    frame = dst_mac + src_mac + tags + ethertype.to_bytes(2, "big") + header + udp
    return frame.ljust(pad_to, b"\0")
