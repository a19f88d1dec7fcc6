"""Processes by identity (pid + start time), never by a pid alone: reading /proc, signalling
through pidfds, reaping what a killed supervisor left to us, and polling with a deadline."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from pathlib import Path

from tests.lab import topology
from tests.lab.processes import poll

Ident = tuple[int, int]  # (pid, start time in clock ticks): a process, never a recycled pid


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[19])


def ident_of(pid: int) -> Ident | None:
    st = proc_stat(pid)
    return None if st is None else (pid, st[2])


def state_of(ident: Ident) -> str | None:
    """The process's state letter (Z for a zombie), or None when that process is gone."""
    st = proc_stat(ident[0])
    return st[0] if st is not None and st[2] == ident[1] else None


def alive(ident: Ident) -> bool:
    return state_of(ident) not in (None, "Z")


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def is_worker_cmdline(cmd: bytes) -> bool:
    """Workers name themselves ``mcrelay: ID`` (the spawner that forks them ``mcrelay: spawner``,
    before that ``python -m mcrelay.worker.spawner``)."""
    return cmd.startswith(b"mcrelay:") or b"\0mcrelay.worker.spawner\0" in cmd


def is_spawner(cmd: bytes) -> bool:
    return cmd.startswith(b"mcrelay: spawner") or b"\0mcrelay.worker.spawner\0" in cmd


def is_spawner_of(cmd: bytes, ppid: int, supervisor: int | None) -> bool:
    """The supervisor's own spawner is no orphan while the supervisor lives."""
    return is_spawner(cmd) and ppid == supervisor


def spawners_of(supervisor: int) -> list[Ident]:
    """The supervisor's spawner(s): they die with it and are re-parented to us like workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_spawner(cmdline(int(entry.name))):
            st = proc_stat(int(entry.name))
            if st is not None and st[1] == supervisor:
                found.append((int(entry.name), st[2]))
    return found


def usage(ident: Ident) -> tuple[int, int] | None:
    """(open descriptors, VmRSS in KiB) of exactly this process, or None when it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{ident[0]}/fd"))
        status = Path(f"/proc/{ident[0]}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    if match is None or state_of(ident) in (None, "Z"):
        return None
    return fds, int(match[1])


def socket_files(root: Path, ns: topology.Netns | None = None) -> list[str]:
    """Unix socket files under ``root``, and with ``ns`` sockets there still bound to a path
    under it (/proc/net/unix is per network namespace, and shows the path of the bind even
    after the file was renamed)."""
    found = {str(p) for p in root.rglob("*") if p.is_socket()}
    for line in ns.run("cat", "/proc/net/unix").splitlines()[1:] if ns else ():
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith(str(root)):
            found.add(f"{fields[7]} (bound)")
    return sorted(found)


def send_signal(ident: Ident, sig: int) -> bool:
    """Signal exactly this process through a pidfd; False when it is already gone."""
    try:
        fd = os.pidfd_open(ident[0])
    except ProcessLookupError:
        return False
    try:
        if state_of(ident) is None:  # the pidfd refers to whatever has the pid now: check it
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def reap_if_ours(ident: Ident) -> None:
    """Workers orphaned by a killed supervisor are re-parented to us (child subreaper)."""
    st = proc_stat(ident[0])
    if st is not None and st[2] == ident[1] and st[1] == os.getpid() and st[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(ident[0], os.WNOHANG)


def reap_wait(ident: Ident, timeout: float) -> None:
    """Wait until a dead process is reaped, reaping it ourselves if it was re-parented to us."""

    def reaped() -> bool:
        reap_if_ours(ident)
        return state_of(ident) != "Z"

    poll(reaped, timeout)


# --- the relay under test -------------------------------------------------------------------
