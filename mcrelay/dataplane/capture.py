"""Capture sockets, opened by the privileged supervisor and passed to data workers (SCM_RIGHTS).

Order of operations, each step forced by the kernel (net/packet/af_packet.c):

1. ``socket(AF_PACKET, SOCK_RAW, 0)``: protocol 0 hooks nothing, so no frame is queued while
   options are set.
2. Options that must hold from the first frame: receive buffer, ``PACKET_IGNORE_OUTGOING``,
   the classic BPF filter (`mcrelay.dataplane.bpf`), so no unfiltered frame is ever queued.
3. ``bind((ifname, ETH_P_ALL))`` starts reception.
4. ``PACKET_FANOUT``: the kernel refuses to join a group with a socket that is not bound with a
   protocol (EINVAL), and refuses to re-bind a member, so fanout comes after bind.

With ``ring=True`` the ring is installed here too, before bind (`mcrelay.dataplane.ring.configure`),
so no frame lands in the plain receive queue that installing a ring later would purge; the data
worker only maps it (``RxRing(sock, configured=True)``) and never sets an option on the socket.
The filter stays the supervisor's as well: it keeps a copy of the descriptor while the worker
lives and replaces the filter in place with `bpf.attach` when rules change.

The supervisor closes its copy as soon as the worker is gone: a fanout member that outlives its
worker keeps receiving its share of the flows, which then go nowhere.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence

from mcrelay.dataplane import bpf
from mcrelay.dataplane import ring as ring_mod
from mcrelay.system import netlink

__all__ = ["ETH_P_ALL", "open_capture_socket"]

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_FANOUT = 18
PACKET_IGNORE_OUTGOING = 23
PACKET_FANOUT_HASH = 0
# Since Linux 6.2. A fanout member receives through the group's hook, so the per-socket
# PACKET_IGNORE_OUTGOING has no effect on it; the group flag does. Older kernels accept and
# ignore the bit, which is why the relay loop also drops PACKET_OUTGOING frames itself.
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000
SO_RCVBUFFORCE = 33
SO_DETACH_FILTER = 27

# Only frames queued between bind and ring setup use this: with a TPACKET_V3 ring the kernel
# writes into the ring and never charges the receive buffer.
DEFAULT_RCVBUF = 8 << 20


def open_capture_socket(
    ifname: str,
    *,
    fanout_group: int | None,
    program: Sequence[bpf.Instruction] | None = None,
    rcvbuf: int = DEFAULT_RCVBUF,
    ring: bool = False,
) -> socket.socket:
    """Open a non-blocking AF_PACKET socket that sees the frames received on `ifname`.

    `program` is a classic BPF filter (`bpf.compile_filter`), attached before bind; without
    one the socket sees every frame. It can be replaced later with `bpf.attach`.

    `fanout_group` (0..65535) joins a PACKET_FANOUT_HASH group: every frame of one flow goes to
    the same member, so flows stay in order, and when a member closes the kernel rehashes over
    the rest. Group ids are per network namespace and shared with every other AF_PACKET user
    in it; all members must be bound to the same interface with the same mode and flags, so use
    one id per capture interface.
    """
    if fanout_group is not None and not 0 <= fanout_group <= 0xFFFF:
        raise ValueError(f"fanout group id must be 0..65535, got {fanout_group}")
    if netlink.interface_index(ifname) is None:
        raise _no_such_interface(ifname)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.setblocking(False)
        _set_rcvbuf(sock, rcvbuf)
        # Until it is in its fanout group the socket would see every frame, not its share, and
        # with a ring those frames would be relayed twice: it takes none until it has joined.
        joining = fanout_group is not None and ring
        if joining:
            bpf.attach(sock, bpf.drop_all())
        elif program is not None:
            bpf.attach(sock, list(program))
        try:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError as exc:  # Linux < 4.20: the relay loop filters PACKET_OUTGOING instead
            if exc.errno != errno.ENOPROTOOPT:
                raise
        if ring:  # before bind: no frame may land in the queue a later ring would purge
            ring_mod.configure(sock)
        try:
            sock.bind((ifname, ETH_P_ALL))
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENXIO):
                raise _no_such_interface(ifname) from None
            raise
        if fanout_group is not None:
            arg = fanout_group | (PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_IGNORE_OUTGOING) << 16
            try:
                sock.setsockopt(SOL_PACKET, PACKET_FANOUT, struct.pack("=I", arg))
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot join fanout group {fanout_group} on {ifname!r}: {exc.strerror}"
                    " (is the id used on another interface or with another mode?)",
                ) from None
        if joining:
            if program is not None:
                bpf.attach(sock, list(program))
            else:
                sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except BaseException:
        sock.close()
        raise
    return sock


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    """SO_RCVBUFFORCE ignores net.core.rmem_max but needs CAP_NET_ADMIN; fall back quietly."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _no_such_interface(ifname: str) -> OSError:
    return OSError(
        errno.ENODEV, f"capture interface {ifname!r} does not exist in this network namespace"
    )
