"""This host's own IPv4 addresses (an rtnetlink dump) and which interfaces are loopback.

Used by the access policy (`mcrelay.policy`) in the supervisor's network namespace, when a rule
is added or loaded: an address assigned later is caught by the next check, not retroactively.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from mcrelay.system.netlink import NLMSGHDR, RTATTR, interface_flags

RTM_NEWADDR = 20
RTM_GETADDR = 22
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFF_LOOPBACK = 0x8

_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_DUMP_TIMEOUT = 2.0


def host_addresses() -> set[ipaddress.IPv4Address]:
    """Every IPv4 address assigned to an interface of this network namespace."""
    request = _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
    header = NLMSGHDR.pack(
        NLMSGHDR.size + len(request), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
    )
    found: set[ipaddress.IPv4Address] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(_DUMP_TIMEOUT)
        sock.sendto(header + request, (0, 0))
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size:
                    return found
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    raise OSError("the kernel refused to list this host's addresses")
                if kind == RTM_NEWADDR:
                    found.update(_addresses(data, offset + NLMSGHDR.size, offset + length))
                offset += (length + 3) & ~3


def _addresses(data: bytes, start: int, end: int) -> list[ipaddress.IPv4Address]:
    if start + _IFADDRMSG.size > end or data[start] != socket.AF_INET:
        return []
    out = []
    attr = start + _IFADDRMSG.size
    while attr + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(data, attr)
        if length < RTATTR.size:
            break
        if kind in (IFA_ADDRESS, IFA_LOCAL) and length == RTATTR.size + 4:
            out.append(ipaddress.IPv4Address(data[attr + RTATTR.size : attr + length]))
        attr += (length + 3) & ~3
    return out


def is_loopback_interface(name: str) -> bool:
    """``lo``, or an existing interface whose flags say loopback (whatever it was renamed to)."""
    if name == "lo":
        return True
    flags = interface_flags(name)
    return flags is not None and bool(flags & IFF_LOOPBACK)
