"""This host's own IPv4 addresses (an rtnetlink dump) and which interfaces are loopback.

Used by the access policy (`mcrelay.policy`) in the supervisor's network namespace, when a rule
is added or loaded: an address assigned later is caught by the next check, not retroactively.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

RTM_NEWADDR = 20
RTM_GETADDR = 22
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFF_LOOPBACK = 0x8
SIOCGIFFLAGS = 0x8913

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")
_DUMP_TIMEOUT = 2.0


def host_addresses() -> set[ipaddress.IPv4Address]:
    """Every IPv4 address assigned to an interface of this network namespace."""
    request = _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(request), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
    )
    found: set[ipaddress.IPv4Address] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(_DUMP_TIMEOUT)
        sock.sendto(header + request, (0, 0))
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    return found
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    raise OSError("the kernel refused to list this host's addresses")
                if kind == RTM_NEWADDR:
                    found.update(_addresses(data, offset + _NLMSGHDR.size, offset + length))
                offset += (length + 3) & ~3


def _addresses(data: bytes, start: int, end: int) -> list[ipaddress.IPv4Address]:
    if start + _IFADDRMSG.size > end or data[start] != socket.AF_INET:
        return []
    out = []
    attr = start + _IFADDRMSG.size
    while attr + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, attr)
        if length < _RTATTR.size:
            break
        if kind in (IFA_ADDRESS, IFA_LOCAL) and length == _RTATTR.size + 4:
            out.append(ipaddress.IPv4Address(data[attr + _RTATTR.size : attr + length]))
        attr += (length + 3) & ~3
    return out


def is_loopback_interface(name: str) -> bool:
    """``lo``, or an existing interface whose flags say loopback (whatever it was renamed to)."""
    if name == "lo":
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            ifreq = fcntl.ioctl(probe, SIOCGIFFLAGS, struct.pack("16sH14x", name.encode(), 0))
        except OSError:
            return False
    (flags,) = struct.unpack_from("H", ifreq, 16)
    return bool(flags & IFF_LOOPBACK)
