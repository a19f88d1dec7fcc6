"""Multicast group memberships, so IGMP reports go out and the NIC accepts the groups' frames.

AF_PACKET capture sees frames only if the interface accepts them, and a switch forwards a group
only to ports that reported it. One helper AF_INET socket holds at most ``igmp_max_memberships``
memberships (20 by default), so memberships are spread over as many sockets as needed instead of
asking users to tune sysctls. The helper sockets are never bound and carry a drop-all filter: the
kernel never queues a copy of the traffic on them.
"""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

from mcrelay.dataplane import bpf
from mcrelay.system import netlink
from mcrelay.system.linux import ip_mreqn

log = logging.getLogger("mcrelay.supervisor")

_MAX_MEMBERSHIPS_FILE = Path("/proc/sys/net/ipv4/igmp_max_memberships")


#: Errors that say the process is short of something, not that this group is wrong.
SHORTAGES = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def max_memberships_per_socket() -> int:
    try:
        return max(1, int(_MAX_MEMBERSHIPS_FILE.read_text()))
    except (OSError, ValueError):
        return 20


class Memberships:
    """Keeps the joined (interface, group) set equal to what the rules need."""

    def __init__(self, per_socket: int | None = None) -> None:
        self._per_socket = per_socket or max_memberships_per_socket()
        self._sockets: list[socket.socket] = []
        self._held: dict[tuple[str, str], tuple[socket.socket, int]] = {}
        self._load: dict[socket.socket, int] = {}
        self._warned: set[tuple[str, str]] = set()
        self._short: set[str] = set()

    @property
    def joined(self) -> set[tuple[str, str]]:
        return set(self._held)

    @property
    def short(self) -> bool:
        """Some joins failed for lack of a resource (descriptors, memory) at the last update."""
        return bool(self._short)

    @property
    def socket_count(self) -> int:
        return len(self._sockets)

    def update(self, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """Join what is wanted, leave what is not; per (interface, group), why it could not join."""
        for key in set(self._held) - wanted:
            self._leave(key)
        problems: dict[tuple[str, str], str] = {}
        short: dict[str, int] = {}  # resource errors: one line per cause, not one per group
        for key in sorted(wanted - set(self._held)):
            try:
                self._join(key)
            except OSError as exc:
                problems[key] = exc.strerror or str(exc)
                if exc.errno in SHORTAGES:
                    short[problems[key]] = short.get(problems[key], 0) + 1
                elif key not in self._warned:  # said once; the rule's state shows it meanwhile
                    log.warning("cannot join %s on %s: %s", key[1], key[0], problems[key])
                    self._warned.add(key)
            else:
                self._warned.discard(key)
        for cause, count in short.items():
            if cause not in self._short:
                log.error("cannot join %d groups: %s (retrying)", count, cause)
        self._short = set(short)
        return problems

    def forget(self, interface: str) -> None:
        """Leave every group on ``interface`` (gone or renumbered); ``update`` joins afresh."""
        for key in [k for k in self._held if k[0] == interface]:
            self._leave(key)

    def _join(self, key: tuple[str, str]) -> None:
        interface, group = key
        ifindex = netlink.interface_index(interface)
        if ifindex is None:
            raise OSError(f"no interface {interface!r}")
        sock = self._socket_with_room()
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, ip_mreqn(group, index=ifindex))
        self._held[key] = (sock, ifindex)
        self._load[sock] += 1

    def _leave(self, key: tuple[str, str]) -> None:
        sock, ifindex = self._held.pop(key)
        try:
            sock.setsockopt(
                socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, ip_mreqn(key[1], index=ifindex)
            )
        except OSError as exc:  # the interface may be gone, and the membership with it
            log.debug("leaving %s on %s: %s", key[1], key[0], exc)
        self._load[sock] -= 1
        if self._load[sock] == 0:
            self._sockets.remove(sock)
            del self._load[sock]
            sock.close()

    def _socket_with_room(self) -> socket.socket:
        for sock in self._sockets:
            if self._load[sock] < self._per_socket:
                return sock
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            bpf.attach(sock, bpf.drop_all())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        except BaseException:
            sock.close()
            raise
        self._sockets.append(sock)
        self._load[sock] = 0
        return sock

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self._held.clear()
        self._load.clear()
