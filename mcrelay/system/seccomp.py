"""A seccomp filter that keeps a data worker's hands off its capture sockets' options.

A capture socket's BPF filter and ring are the supervisor's (it attaches the filter before bind
and replaces it in place on rule changes). The kernel's own lock (``SO_LOCK_FILTER``) cannot be
used for that: it is one-way and binds every holder of the socket, the supervisor included. So
the data worker, once started, forbids itself what it never needs:

- ``setsockopt`` at level ``SOL_PACKET`` (ring, fanout, memberships such as promiscuous mode,
  ignore-outgoing...), on any socket;
- ``setsockopt`` of ``SO_ATTACH_FILTER``, ``SO_DETACH_FILTER``, ``SO_ATTACH_BPF`` and
  ``SO_LOCK_FILTER``, on any socket;
- ``io_uring_setup`` (io_uring can set socket options without the ``setsockopt`` system call),
  x32 system calls and any other architecture's system calls (another ABI's numbers).

Each is answered ``EPERM``; every other system call is allowed. The filter is written here as
classic BPF — a dozen instructions, no binding needed — and installed with ``seccomp(2)`` for
every thread of the process (``SECCOMP_FILTER_FLAG_TSYNC``). It needs ``PR_SET_NO_NEW_PRIVS``
(workers set it) and is inherited by every thread and child, and can never be removed.
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket
import struct
import sys

from mcrelay.system.linux import (
    SO_ATTACH_BPF,
    SO_ATTACH_FILTER,
    SO_DETACH_FILTER,
    SO_LOCK_FILTER,
    SOL_PACKET,
)

__all__ = [
    "DENIED_SOCKET_OPTIONS",
    "SeccompUnavailable",
    "forbid_capture_changes",
    "program",
]

DENIED_SOCKET_OPTIONS = (SO_ATTACH_FILTER, SO_DETACH_FILTER, SO_LOCK_FILTER, SO_ATTACH_BPF)

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
X32_SYSCALL_BIT = 0x40000000

# (AUDIT_ARCH_*, __NR_setsockopt, __NR_io_uring_setup, __NR_seccomp) per machine.
_ARCHES = {
    "x86_64": (0xC000003E, 54, 425, 317),
    "aarch64": (0xC00000B7, 208, 425, 277),
}

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_SOCK_FILTER = struct.Struct("=HBBI")
_SOCK_FPROG = struct.Struct("@HP")

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
_NR, _ARCH = 0, 4
_ARG_LOW = 0 if sys.byteorder == "little" else 4  # ints are the low half of each 64-bit arg


def _arg(i: int) -> int:
    return 16 + 8 * i + _ARG_LOW


class SeccompUnavailable(OSError):
    """The filter could not be installed (unknown machine, or the kernel refused it)."""


def program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter for ``machine`` (default: this one), as (code, jt, jf, k) instructions."""
    name = machine or platform.machine()
    if name not in _ARCHES:
        raise SeccompUnavailable(f"no seccomp filter for machine {name!r}")
    arch, nr_setsockopt, nr_io_uring_setup, _ = _ARCHES[name]
    deny = SECCOMP_RET_ERRNO | EPERM
    # In order: (operation, operand, where a jump goes); "jne" jumps when *not* equal.
    checks: list[tuple[str, int, str]] = [
        ("ld", _ARCH, ""),
        ("jne", arch, "deny"),
        ("ld", _NR, ""),
        ("jge", X32_SYSCALL_BIT, "deny"),
        ("jeq", nr_io_uring_setup, "deny"),
        ("jne", nr_setsockopt, "allow"),
        ("ld", _arg(1), ""),
        ("jeq", SOL_PACKET, "deny"),
        ("jne", socket.SOL_SOCKET, "allow"),
        ("ld", _arg(2), ""),
        *(("jeq", option, "deny") for option in DENIED_SOCKET_OPTIONS),
    ]
    allow_at = len(checks)  # then RET ALLOW, then RET ERRNO(EPERM)
    deny_at = allow_at + 1
    out: list[tuple[int, int, int, int]] = []
    for i, (op, k, target) in enumerate(checks):
        if op == "ld":
            out.append((_LD_W_ABS, 0, 0, k))
            continue
        offset = (allow_at if target == "allow" else deny_at) - i - 1
        if op == "jeq":
            out.append((_JEQ_K, offset, 0, k))
        elif op == "jge":
            out.append((_JGE_K, offset, 0, k))
        else:  # jne: fall through on equality, jump otherwise
            out.append((_JEQ_K, 0, offset, k))
    out.append((_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    out.append((_RET_K, 0, 0, deny))
    return out


def forbid_capture_changes() -> None:
    """Install the filter for every thread of this process; SeccompUnavailable if impossible."""
    name = platform.machine()
    code = program(name)
    nr_seccomp = _ARCHES[name][3]
    raw = b"".join(_SOCK_FILTER.pack(*insn) for insn in code)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    fprog = ctypes.create_string_buffer(_SOCK_FPROG.pack(len(code), ctypes.addressof(buffer)))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(
        ctypes.c_long(nr_seccomp),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC),
        fprog,
    )
    if result < 0:
        errno = ctypes.get_errno()
        raise SeccompUnavailable(
            errno, f"the kernel refused the seccomp filter: {os.strerror(errno)}"
        )
    if result > 0:  # TSYNC: that thread could not take the filter
        raise SeccompUnavailable(f"thread {result} of this process could not take the filter")
