"""Who is on the other end of the control socket (SO_PEERCRED), and what they may do.

Roles, from the peer's credentials as the kernel reports them at connect time:

- root and the supervisor's own user: every request;
- members of ``--socket-group``: every request (rules, workers, log level);
- members of ``--read-group``: only requests that change nothing (`READ_REQUESTS`);
- anyone else: refused with one sentence.

The socket file's mode (0660 with the socket's group; 0666 when a read group exists, because a
file has one group owner) is only a first fence: this check holds whatever the file allows.
"""

from __future__ import annotations

import enum
import socket
import struct

import trio

from mcrelay.ipc import messages as m

_UCRED = struct.Struct("3i")  # pid, uid, gid


class Role(enum.StrEnum):
    ADMIN = "admin"  # root or the supervisor's user
    OPERATOR = "operator"  # --socket-group
    READER = "reader"  # --read-group


#: What a reader may ask (a log-level request without a level only reads it).
READ_REQUESTS = (m.Ping, m.ListWorkers, m.ListRules, m.GetStats)

#: How a request that changes something is named when a reader is refused it.
_CHANGES: dict[type, str] = {
    m.AddRule: "add",
    m.RemoveRule: "remove",
    m.ReplaceRules: "config load",
    m.RestartWorker: "restart-worker",
    m.LogLevel: "log-level LEVEL",
}


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> tuple[int, int, int]:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid, gid


def _supplementary_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def role_of(
    pid: int,
    uid: int,
    gid: int,
    *,
    owner_uid: int,
    allowed_gid: int | None,
    read_gid: int | None = None,
) -> Role | None:
    """The peer's role, or None when it may not use the daemon at all."""
    if uid in (0, owner_uid):
        return Role.ADMIN
    if allowed_gid is None and read_gid is None:
        return None
    groups = {gid} | _supplementary_groups(pid)
    if allowed_gid is not None and allowed_gid in groups:
        return Role.OPERATOR
    if read_gid is not None and read_gid in groups:
        return Role.READER
    return None


def denied(uid: int, allowed_gid: int | None, read_gid: int | None) -> str:
    who = f"uid {uid}"
    if allowed_gid is None and read_gid is None:
        return f"permission denied: {who} is not root (the daemon admits root only)"
    groups = []
    if allowed_gid is not None:
        groups.append(f"the socket's group (gid {allowed_gid})")
    if read_gid is not None:
        groups.append(f"the read group (gid {read_gid})")
    return f"permission denied: {who} is neither root nor in {' nor '.join(groups)}"


def request_refusal(role: Role, uid: int, request: object, read_gid: int | None) -> str | None:
    """None when ``role`` may make ``request``, else the one sentence to answer."""
    if role is not Role.READER:
        return None
    if isinstance(request, READ_REQUESTS):
        return None
    if isinstance(request, m.LogLevel) and request.level is None:
        return None
    what = _CHANGES.get(type(request), type(request).__name__)
    return (
        f"permission denied: uid {uid} may only read (the read group, gid {read_gid}); "
        f"{what} needs root or the socket's group"
    )
