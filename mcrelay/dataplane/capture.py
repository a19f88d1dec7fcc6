"""Capture sockets, opened by the privileged supervisor and passed to data workers (SCM_RIGHTS).

Order of operations, each step forced by the kernel (net/packet/af_packet.c):

1. ``socket(AF_PACKET, SOCK_RAW, 0)``: protocol 0 hooks nothing, so no frame is queued while
   options are set.
2. Options that must hold from the first frame: receive buffer, ``PACKET_IGNORE_OUTGOING``,
   the classic BPF filter (`mcrelay.dataplane.bpf`), so no unfiltered frame is ever queued,
   and the receive ring (`mcrelay.dataplane.ring.configure`), so no frame lands in the plain
   receive queue that installing a ring later would purge.
3. ``bind((ifname, ETH_P_ALL))`` starts reception.
4. ``PACKET_FANOUT``: the kernel refuses to join a group with a socket that is not bound with a
   protocol (EINVAL), and refuses to re-bind a member, so fanout comes after bind.

The ring's geometry travels with the socket (`AttachCapture.ring`, a `CaptureSpec`): the data
worker only maps what the supervisor installed (``RxRing(sock, spec)``) and never sets an
option on the socket. The filter stays the supervisor's as well: it keeps a copy of the
descriptor while the worker lives and replaces the filter in place with `bpf.attach` when rules
change.

The supervisor keeps its copy when the worker dies, and hands it to the replacement: the frames
that arrive meanwhile wait in the ring, and a fanout member's share of the flows waits for its
next reader instead of going to nobody (`mcrelay.supervisor.captures` says when it lets go).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence

from mcrelay.dataplane import bpf
from mcrelay.dataplane import ring as ring_mod
from mcrelay.dataplane.ring_size import CAPTURE_RING
from mcrelay.ipc.messages import CaptureSpec
from mcrelay.system import netlink
from mcrelay.system.linux import (
    ETH_P_ALL,
    PACKET_FANOUT,
    PACKET_FANOUT_FLAG_IGNORE_OUTGOING,
    PACKET_FANOUT_HASH,
    PACKET_IGNORE_OUTGOING,
    SO_DETACH_FILTER,
    SO_RCVBUFFORCE,
    SOL_PACKET,
    set_buffer,
)

__all__ = ["CAPTURE_RING", "open_capture_socket"]


# Only frames queued between bind and ring setup use this: with a TPACKET_V3 ring the kernel
# writes into the ring and never charges the receive buffer.
DEFAULT_RCVBUF = 8 << 20


def open_capture_socket(
    ifname: str,
    ring: CaptureSpec,
    *,
    fanout_group: int | None,
    program: Sequence[bpf.Instruction] | None = None,
) -> socket.socket:
    """Open a non-blocking AF_PACKET socket with the receive ring `ring` that sees the frames
    received on `ifname`; map it with ``RxRing(sock, ring)``.

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
        set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, DEFAULT_RCVBUF)
        # Until it is in its fanout group the socket would see every frame, not its share, and
        # with a ring those frames would be relayed twice: it takes none until it has joined.
        joining = fanout_group is not None
        if joining:
            bpf.attach(sock, bpf.drop_all())
        elif program is not None:
            bpf.attach(sock, list(program))
        try:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError as exc:  # Linux < 4.20: the relay loop filters PACKET_OUTGOING instead
            if exc.errno != errno.ENOPROTOOPT:
                raise
        ring_mod.configure(sock, ring)  # before bind: nothing may land in a queue it purges
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


def _no_such_interface(ifname: str) -> OSError:
    return OSError(
        errno.ENODEV, f"capture interface {ifname!r} does not exist in this network namespace"
    )
