"""Files the supervisor creates as root, in directories it does not follow blindly.

A directory that another user can write to lets that user swap a name the supervisor is about to
open, chmod or rename (a symlink to /etc/shadow, say). So the socket and state directories must
be owned by root or by the supervisor's own uid and must not be world-writable unless sticky;
files in them are opened without following a symlink at the last component, and temporary files
get an unpredictable name created exclusively.

The control socket's default path lives here too: the daemon creates it and every client
connects to it, so both import it from this neutral place.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

from mcrelay.errors import McrelayError

#: Where the daemon listens and clients connect unless told otherwise (packaging/systemd agrees).
DEFAULT_CONTROL_SOCKET = Path("/run/mcrelay/control.sock")

# A new file is created, never reused, and a symlink at its name is never followed.
EXCLUSIVE_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(McrelayError):
    """A directory or file the supervisor would use could be redirected by another user."""


def ensure_safe_directory(directory: Path, what: str) -> None:
    """Create ``directory`` if missing; refuse it when another user could swap names in it."""
    directory.mkdir(parents=True, exist_ok=True)
    check_directory(directory, what)


def check_directory(directory: Path, what: str) -> None:
    """UnsafePath (one sentence naming ``directory``) unless only root or we can write in it."""
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"refusing the {what} {directory}: it is not a directory")
    if info.st_uid not in (0, os.geteuid()):
        raise UnsafePath(
            f"refusing the {what} {directory}: it is owned by uid {info.st_uid}, "
            "neither root nor the supervisor's user"
        )
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise UnsafePath(
            f"refusing the {what} {directory}: it is world-writable without the sticky bit"
        )


def open_lock_file(path: Path) -> int:
    """A read-write fd of the regular file ``path`` (created 0644 if missing), never through a
    symlink and never truncated; UnsafePath for a symlink or anything else that is not ours."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"refusing the lock file {path}: it is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePath(f"refusing the lock file {path}: it is not a regular file")
        if info.st_uid not in (0, os.geteuid()):
            raise UnsafePath(
                f"refusing the lock file {path}: it is owned by uid {info.st_uid}, "
                "neither root nor the supervisor's user"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_temporary(directory: Path, name: str, mode: int) -> tuple[Path, int]:
    """A new file ``.NAME.RANDOM.tmp`` in ``directory`` and its write fd: O_EXCL|O_NOFOLLOW, so
    nothing placed at a guessed name beforehand can receive the write."""
    path = directory / f".{name}.{secrets.token_hex(8)}.tmp"
    return path, os.open(path, EXCLUSIVE_CREATE, mode)
