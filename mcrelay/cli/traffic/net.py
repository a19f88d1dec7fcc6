"""Socket plumbing shared by gen and sink: interfaces, addresses and batched send/receive.

`sendmmsg`/`recvmmsg` come from libc through ctypes: one system call per batch instead of one
per datagram is what lets a Python sink keep up with ~100k pps. The mmsghdr array lives in a
bytearray so the kernel's per-message results are read with slicing, not ctypes attributes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import os
import socket
import struct
import sys

from mcrelay.dataplane import mmsg
from mcrelay.dataplane.mmsg import IoVec, MMsgHdr, MsgHdr
from mcrelay.errors import McrelayError
from mcrelay.system.linux import SO_TIMESTAMPNS

SCM_TIMESTAMPNS = SO_TIMESTAMPNS


class ToolError(McrelayError):
    """gen or sink cannot run (unknown interface, socket error); the message is for the user."""


def is_multicast(addr: str) -> bool:
    return ipaddress.IPv4Address(addr).is_multicast


def ifindex(name: str) -> int:
    """The index of interface `name`, or ToolError naming it."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise ToolError(f"no such network interface: {name!r}") from None


def sockaddr_in(addr: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", port, socket.inet_aton(addr))


_MMSG_SIZE = ctypes.sizeof(MMsgHdr)
_MSG_LEN_AT = MMsgHdr.msg_len.offset
_CONTROLLEN_AT = MsgHdr.msg_controllen.offset
_CMSG_HDR = mmsg.cmsg_len(0)
CMSG_SPACE_TIMESPEC = mmsg.cmsg_space(16)

_sendmmsg = mmsg.sendmmsg
_recvmmsg = mmsg.recvmmsg

# Kernel timestamps are parsed at fixed offsets: 64-bit little-endian layouts only.
HAVE_KERNEL_TIMESTAMPS = (
    ctypes.sizeof(ctypes.c_long) == 8 and _CMSG_HDR == 16 and sys.byteorder == "little"
)


def have_mmsg() -> bool:
    return _sendmmsg is not None and _recvmmsg is not None and _MMSG_SIZE % 4 == 0


def _address(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


class MmsgBatch:
    """`n` datagram slots of `slot` bytes each, with optional per-slot control space.

    `data` holds slot i at i*slot; `control` holds slot i's control messages at i*ctrl. The
    kernel rewrites lengths and flags on every receive, so `recv` restores them from a template.
    """

    def __init__(self, n: int, slot: int, *, ctrl: int = 0, name: bytes | None = None) -> None:
        if ctrl % 8:
            raise ValueError("control space per slot must be a multiple of 8")
        self.data = bytearray(n * slot)
        self.control = bytearray(max(n * ctrl, 1))
        self._name = bytearray(name or b"\0")
        self._iov = (IoVec * n)()
        self._hdrs = bytearray(n * _MMSG_SIZE)
        self._msgs = (MMsgHdr * n).from_buffer(self._hdrs)
        data_at, control_at, name_at = (
            _address(self.data),
            _address(self.control),
            _address(self._name),
        )
        for i in range(n):
            self._iov[i].iov_base = data_at + i * slot
            self._iov[i].iov_len = slot
            hdr = self._msgs[i].msg_hdr
            hdr.msg_iov = ctypes.addressof(self._iov[i])
            hdr.msg_iovlen = 1
            if name is not None:
                hdr.msg_name, hdr.msg_namelen = name_at, len(name)
            if ctrl:
                hdr.msg_control, hdr.msg_controllen = control_at + i * ctrl, ctrl
        self._template = bytes(self._hdrs)
        self._lengths = memoryview(self._hdrs).cast("I")[_MSG_LEN_AT // 4 :: _MMSG_SIZE // 4]
        if ctrl and HAVE_KERNEL_TIMESTAMPS:
            per_msg = _MMSG_SIZE // 8
            self._controllens = memoryview(self._hdrs).cast("Q")[_CONTROLLEN_AT // 8 :: per_msg]
            words = memoryview(self.control).cast("q")
            self._cmsg_sec = words[2 :: ctrl // 8]
            self._cmsg_nsec = words[3 :: ctrl // 8]
            self._cmsg_kind = words[1 :: ctrl // 8]  # cmsg_level | cmsg_type << 32

    def send(self, fd: int, count: int) -> int:
        """Send slots 0..count-1; returns how many went, or raises OSError (errno intact)."""
        assert _sendmmsg is not None
        sent: int = _sendmmsg(fd, ctypes.addressof(self._msgs), count, 0)
        if sent < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return sent

    def recv(self, fd: int, count: int, flags: int = socket.MSG_DONTWAIT) -> int:
        """Receive into slots 0..count-1; returns how many arrived, or raises OSError."""
        assert _recvmmsg is not None
        self._hdrs[:] = self._template
        got: int = _recvmmsg(fd, ctypes.addressof(self._msgs), count, flags, None)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return got

    def lengths(self, count: int) -> list[int]:
        """Datagram lengths of the first `count` slots after `recv`."""
        return self._lengths[:count].tolist()

    def kernel_times(self, count: int) -> list[int]:
        """Per slot, the SO_TIMESTAMPNS receive time in ns, or 0 where the kernel gave none.

        Needs `ctrl` >= CMSG_SPACE_TIMESPEC and HAVE_KERNEL_TIMESTAMPS; reads only the first
        control message, the only one a sink asks for.
        """
        kind = socket.SOL_SOCKET | SCM_TIMESTAMPNS << 32
        return [
            sec * 1_000_000_000 + nsec if clen >= CMSG_SPACE_TIMESPEC and k == kind else 0
            for clen, k, sec, nsec in zip(
                self._controllens[:count].tolist(),
                self._cmsg_kind[:count].tolist(),
                self._cmsg_sec[:count].tolist(),
                self._cmsg_nsec[:count].tolist(),
                strict=True,
            )
        ]
