"""Linux values the `socket` module does not export, and the few helpers built on them.

Defined once here, so the capture sockets, the ring, egress, group memberships, the seccomp
filter and the traffic tools all name the same numbers. Values are from the uapi headers
(asm-generic layouts: x86, arm, riscv), cited next to each group.
"""

from __future__ import annotations

import socket
import struct

__all__ = [
    "ETH_P_ALL",
    "IP_MULTICAST_ALL",
    "IP_RECVERR",
    "PACKET_FANOUT",
    "PACKET_FANOUT_FLAG_IGNORE_OUTGOING",
    "PACKET_FANOUT_HASH",
    "PACKET_HOST",
    "PACKET_IGNORE_OUTGOING",
    "PACKET_MULTICAST",
    "PACKET_OUTGOING",
    "PACKET_RX_RING",
    "PACKET_STATISTICS",
    "PACKET_VERSION",
    "SIOCGIFMTU",
    "SOL_PACKET",
    "SOL_UDP",
    "SO_ATTACH_BPF",
    "SO_ATTACH_FILTER",
    "SO_DETACH_FILTER",
    "SO_LOCK_FILTER",
    "SO_RCVBUFFORCE",
    "SO_SNDBUFFORCE",
    "SO_TIMESTAMPNS",
    "TPACKET3_HDRLEN",
    "TPACKET_V3",
    "TP_STATUS_BLK_TMO",
    "TP_STATUS_COPY",
    "TP_STATUS_CSUMNOTREADY",
    "TP_STATUS_KERNEL",
    "TP_STATUS_LOSING",
    "TP_STATUS_USER",
    "TP_STATUS_VLAN_TPID_VALID",
    "TP_STATUS_VLAN_VALID",
    "UDP_SEGMENT",
    "ip_mreqn",
    "set_buffer",
]

# --- AF_PACKET (linux/if_ether.h, linux/if_packet.h) ---------------------------------------

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_FANOUT = 18
PACKET_IGNORE_OUTGOING = 23
PACKET_FANOUT_HASH = 0
# Since Linux 6.2. A fanout member receives through the group's hook, so the per-socket
# PACKET_IGNORE_OUTGOING has no effect on it; the group flag does. Older kernels accept and
# ignore the bit, which is why the relay loop also drops PACKET_OUTGOING frames itself.
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000
# sockaddr_ll.sll_pkttype: to this host, to a group, sent by this host.
PACKET_HOST = 0
PACKET_MULTICAST = 2
PACKET_OUTGOING = 4

TPACKET_V3 = 2
TPACKET3_HDRLEN = 48 + 20  # TPACKET_ALIGN(sizeof(tpacket3_hdr)) + sizeof(sockaddr_ll)
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_COPY = 1 << 1  # V1/V2 only: frame truncated in the ring, whole copy queued
TP_STATUS_LOSING = 1 << 2  # block: frames were dropped since statistics were last read
TP_STATUS_CSUMNOTREADY = 1 << 3
TP_STATUS_VLAN_VALID = 1 << 4  # the kernel stripped the outer tag into tp_vlan_tci
TP_STATUS_BLK_TMO = 1 << 5  # block retired by the timer, not because it was full
TP_STATUS_VLAN_TPID_VALID = 1 << 6

# --- socket options (asm-generic/socket.h) -------------------------------------------------

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
SO_DETACH_FILTER = 27
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35
SO_LOCK_FILTER = 44
SO_ATTACH_BPF = 50

# --- IPv4 and UDP (linux/in.h, linux/udp.h, linux/sockios.h) -------------------------------

IP_RECVERR = 11
IP_MULTICAST_ALL = 49
SOL_UDP = 17
UDP_SEGMENT = 103
SIOCGIFMTU = 0x8921

_MREQN = struct.Struct("=4s4si")


def ip_mreqn(group: str, address: str = "0.0.0.0", index: int = 0) -> bytes:
    """struct ip_mreqn, for IP_ADD_MEMBERSHIP / IP_DROP_MEMBERSHIP / IP_MULTICAST_IF.

    It names the interface by index, which stays right with unnumbered links and with several
    interfaces sharing an address (the plain ip_mreq names it by address)."""
    return _MREQN.pack(socket.inet_aton(group), socket.inet_aton(address), index)


def set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> int:
    """Ask for a `size`-byte socket buffer; the size the kernel granted.

    `force` (SO_RCVBUFFORCE / SO_SNDBUFFORCE) ignores the net.core.[rw]mem_max cap but needs
    CAP_NET_ADMIN; without it, `plain` (SO_RCVBUF / SO_SNDBUF) asks for what the cap allows.
    A buffer size is a wish, never a reason to fail, so any refusal falls back quietly.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)
    return sock.getsockopt(socket.SOL_SOCKET, plain)
