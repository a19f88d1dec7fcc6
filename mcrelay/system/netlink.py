"""Link events from the kernel (rtnetlink), so rules follow interfaces that come and go.

A raw NETLINK_ROUTE socket subscribed to RTMGRP_LINK is all this needs: the messages are parsed
here (ifinfomsg + the IFLA_IFNAME attribute) rather than pulling in a netlink library.
"""

from __future__ import annotations

import enum
import fcntl
import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

import trio

RTMGRP_LINK = 1
RTM_NEWLINK = 16
RTM_DELLINK = 17
IFLA_IFNAME = 3
IFF_UP = 0x1
IFF_RUNNING = 0x40
SIOCGIFFLAGS = 0x8913
SIOCGIFINDEX = 0x8933

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
RTATTR = struct.Struct("=HH")


class LinkState(enum.StrEnum):
    ABSENT = "absent"
    DOWN = "down"
    UP = "up"


_probe: socket.socket | None = None


def probe_socket() -> socket.socket:
    """The one socket interface ioctls go through, opened once and kept.

    A socket per look (as ``if_nametoindex`` opens inside libc) fails with EMFILE when the
    process is out of descriptors, and that failure looked like "no such interface"; the kept
    socket costs one descriptor for the life of the process and makes every look free. Call it
    at start so it exists before descriptors can run short; failing to open it is an OSError
    naming the cause, never "absent".
    """
    global _probe
    if _probe is None:
        _probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return _probe


def _ifreq(name: str, request: int, fmt: str) -> int | None:
    encoded = name.encode()
    if not encoded or len(encoded) >= 16 or b"\0" in encoded:
        return None
    probe = probe_socket()
    try:
        ifreq = fcntl.ioctl(probe, request, struct.pack(f"16s{fmt}", encoded, 0))
    except OSError:
        return None
    (value,) = struct.unpack_from(fmt, ifreq, 16)
    return int(value)


def interface_index(name: str) -> int | None:
    """The interface's index, or None when there is no such interface."""
    return _ifreq(name, SIOCGIFINDEX, "i20x")


def interface_exists(name: str) -> bool:
    return interface_index(name) is not None


def interface_flags(name: str) -> int | None:
    """The interface's IFF_* flags, or None when there is no such interface."""
    return _ifreq(name, SIOCGIFFLAGS, "H22x")


def link_state(name: str) -> LinkState:
    """The interface's state now: absent, down (admin down or no carrier), or up."""
    flags = interface_flags(name)
    if flags is None:
        return LinkState.ABSENT
    return LinkState.UP if flags & IFF_UP and flags & IFF_RUNNING else LinkState.DOWN


class Link(NamedTuple):
    """An interface as plumbing bound to it sees it: its state and its index. An interface
    deleted and created again under the same name gets a new index, and sockets, memberships
    and routes bound to the old one are dead even though the name is up again."""

    state: LinkState
    ifindex: int  # 0: absent


def link(name: str) -> Link:
    """The interface's state and index now."""
    ifindex = interface_index(name)
    if ifindex is None:
        return Link(LinkState.ABSENT, 0)
    state = link_state(name)
    return Link(state, 0 if state is LinkState.ABSENT else ifindex)


def parse(data: bytes) -> Iterator[tuple[str, LinkState]]:
    """(interface name, state) for each link message in one netlink datagram."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            return
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            body = offset + NLMSGHDR.size
            if body + _IFINFOMSG.size <= offset + length:
                _, _, _, flags, _ = _IFINFOMSG.unpack_from(data, body)
                name = _ifname(data, body + _IFINFOMSG.size, offset + length)
                if name is not None:
                    if kind == RTM_DELLINK:
                        state = LinkState.ABSENT
                    elif flags & IFF_UP and flags & IFF_RUNNING:
                        state = LinkState.UP
                    else:
                        state = LinkState.DOWN
                    yield name, state
        offset += (length + 3) & ~3


def _ifname(data: bytes, start: int, end: int) -> str | None:
    while start + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(data, start)
        if length < RTATTR.size:
            return None
        if kind == IFLA_IFNAME:
            return (
                data[start + RTATTR.size : start + length]
                .split(b"\0", 1)[0]
                .decode(errors="replace")
            )
        start += (length + 3) & ~3
    return None


class LinkMonitor:
    """Receives link change notifications; ``receive()`` waits for the next batch."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        sock.setblocking(False)
        sock.bind((0, RTMGRP_LINK))
        self._sock = trio.socket.from_stdlib_socket(sock)

    async def receive(self) -> list[tuple[str, LinkState]]:
        try:
            data = await self._sock.recv(65536)
        except OSError:  # ENOBUFS: events were lost; the caller re-checks every interface
            return []
        return list(parse(data))

    def close(self) -> None:
        self._sock.close()
