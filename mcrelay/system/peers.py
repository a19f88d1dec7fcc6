"""Who is on the other end of the control socket (SO_PEERCRED), and whether they may use it.

Policy: root, the supervisor's own user and members of the socket's group (``--socket-group``)
may use every command; anyone else is refused with a clear message. The socket file's mode (0660)
already keeps others out; this check holds even if someone loosens the file's permissions.
"""

from __future__ import annotations

import socket
import struct

import trio

_UCRED = struct.Struct("3i")  # pid, uid, gid


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


def refusal(pid: int, uid: int, gid: int, *, owner_uid: int, allowed_gid: int | None) -> str | None:
    """None when the peer may use the daemon, else the reason to tell it."""
    if uid in (0, owner_uid):
        return None
    if allowed_gid is not None and (
        gid == allowed_gid or allowed_gid in _supplementary_groups(pid)
    ):
        return None
    who = f"uid {uid}"
    if allowed_gid is None:
        return f"permission denied: {who} is not root (the daemon admits root only)"
    return f"permission denied: {who} is neither root nor in the socket's group (gid {allowed_gid})"
