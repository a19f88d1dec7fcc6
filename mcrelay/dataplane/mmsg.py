"""The C side of batched datagram I/O, defined once: msghdr and cmsghdr structures and libc's
sendmmsg and recvmmsg, used by the relay's egress and by the traffic tools."""

from __future__ import annotations

import ctypes
import ctypes.util


class IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class MsgHdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class MMsgHdr(ctypes.Structure):
    _fields_ = (("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint))


class CMsgHdr(ctypes.Structure):
    """struct cmsghdr; a control message's data follows it at ``cmsg_len(0)``."""

    _fields_ = (
        ("cmsg_len", ctypes.c_size_t),
        ("cmsg_level", ctypes.c_int),
        ("cmsg_type", ctypes.c_int),
    )


_CMSG_ALIGN = ctypes.sizeof(ctypes.c_size_t)


def _cmsg_align(n: int) -> int:
    return (n + _CMSG_ALIGN - 1) & ~(_CMSG_ALIGN - 1)


def cmsg_len(n: int) -> int:
    """CMSG_LEN(n): the cmsg_len of a control message carrying `n` bytes of data."""
    return _cmsg_align(ctypes.sizeof(CMsgHdr)) + n


def cmsg_space(n: int) -> int:
    """CMSG_SPACE(n): the control buffer bytes a message carrying `n` bytes of data takes."""
    return _cmsg_align(ctypes.sizeof(CMsgHdr)) + _cmsg_align(n)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
sendmmsg = getattr(_libc, "sendmmsg", None)
recvmmsg = getattr(_libc, "recvmmsg", None)
if sendmmsg is not None:
    sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
    sendmmsg.restype = ctypes.c_int
if recvmmsg is not None:
    recvmmsg.argtypes = (
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    )
    recvmmsg.restype = ctypes.c_int
