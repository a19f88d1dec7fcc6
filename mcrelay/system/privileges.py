"""Least privilege: the supervisor checks what it needs; workers keep nothing.

Only the supervisor opens raw sockets. Workers get their sockets by SCM_RIGHTS, so they run as an
unprivileged user with an empty capability set and PR_SET_NO_NEW_PRIVS: a compromised control
worker (it parses untrusted input) or data worker (it parses packets) can do very little.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
import sys

import prctl

from mcrelay.errors import McrelayError

DEFAULT_WORKER_USER = "nobody"

log = logging.getLogger("mcrelay.supervisor")


class PrivilegeError(McrelayError):
    pass


def worker_identity(user: str) -> tuple[int, int] | None:
    """(uid, gid) to run workers as, or None to keep ours (already unprivileged, or same user)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"--user {user}: no such user") from None
    if os.geteuid() != 0 or entry.pw_uid == os.geteuid():
        return None
    blocked = [p for p in _needed_paths() if not _reachable(p, entry.pw_uid, entry.pw_gid)]
    if blocked:
        log.warning(
            "workers keep the supervisor's user (still without capabilities): user %s cannot "
            "reach %s; install mcrelay with a Python under /usr or /opt to drop the user too",
            user,
            blocked[0],
        )
        return None
    return entry.pw_uid, entry.pw_gid


def _needed_paths() -> list[str]:
    """What a worker process must execute or read: the interpreter, stdlib and packages."""
    import trio

    import mcrelay

    return [
        os.path.realpath(sys.executable),
        os.path.dirname(os.__file__),
        os.path.dirname(os.path.realpath(mcrelay.__file__)),
        os.path.dirname(os.path.realpath(trio.__file__)),
    ]


def _reachable(path: str, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` may traverse every directory to ``path`` and read it."""
    parts = path.split(os.sep)
    for i in range(1, len(parts) + 1):
        current = os.sep.join(parts[:i]) or os.sep
        try:
            st = os.stat(current)
        except OSError:
            return False
        need = stat.S_IXOTH if i < len(parts) or stat.S_ISDIR(st.st_mode) else stat.S_IROTH
        group_need = need << 3
        if st.st_uid == uid:
            continue
        if st.st_gid == gid and st.st_mode & group_need:
            continue
        if not st.st_mode & need:
            return False
    return True


def check_supervisor(switch_user: bool) -> None:
    """Fail with one clear sentence when a capability the supervisor needs is missing."""
    needed = {"net_raw": "CAP_NET_RAW"}
    if switch_user:
        needed |= {"setuid": "CAP_SETUID", "setgid": "CAP_SETGID"}
    missing = [cap for attr, cap in needed.items() if not getattr(prctl.cap_effective, attr)]
    if missing:
        raise PrivilegeError(
            f"mcrelay supervisor needs {', '.join(missing)} (run it as root, or grant the "
            "capabilities, e.g. AmbientCapabilities= in its systemd unit)"
        )


def lock_down_worker() -> None:
    """Empty every capability set and forbid regaining privileges (setuid binaries, file caps)."""
    prctl.set_no_new_privs(True)
    if prctl.cap_effective.setpcap:
        for cap in prctl.ALL_CAPS:
            prctl.capbset_drop(cap)
    prctl.cap_inheritable.limit()
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
