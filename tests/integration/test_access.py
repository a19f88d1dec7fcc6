"""Who may use the control socket: mode 0660, --socket-group, and SO_PEERCRED behind it."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcrelay.system.privileges import _needed_paths, _reachable
from tests.integration.daemon import daemon

OTHER = pwd.getpwnam("daemon")  # an unprivileged user that exists on every Debian system


def as_user(user: pwd.struct_passwd, socket: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcrelay", "ping", "--socket", str(socket)],
        capture_output=True, text=True, timeout=30, user=user.pw_uid, group=user.pw_gid,
        extra_groups=[], cwd="/",
    )  # fmt: skip


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(_reachable(p, OTHER.pw_uid, OTHER.pw_gid) for p in _needed_paths()),
    reason="needs root and a Python other users can run (scripts/setup makes one)",
)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's own tmp tree is private)."""
    with tempfile.TemporaryDirectory(prefix="mcrelay-access-") as tmp:
        Path(tmp).chmod(0o755)
        yield Path(tmp)


def test_socket_is_0660_and_others_are_refused(open_dir: Path) -> None:
    with daemon(open_dir, "--num-workers", "1") as d:
        st = d.socket.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        refused = as_user(OTHER, d.socket)
        assert refused.returncode == 1
        assert "permission denied" in refused.stderr
        # Even with the file opened up, the daemon itself refuses (SO_PEERCRED).
        d.socket.chmod(0o666)
        refused = as_user(OTHER, d.socket)
        assert refused.returncode == 1
        assert f"permission denied: uid {OTHER.pw_uid} is not root" in refused.stderr


def test_socket_group_members_may_use_it(open_dir: Path) -> None:
    group = grp.getgrgid(OTHER.pw_gid).gr_name
    with daemon(open_dir, "--num-workers", "1", "--socket-group", group) as d:
        assert d.socket.stat().st_gid == OTHER.pw_gid
        allowed = as_user(OTHER, d.socket)
        assert allowed.returncode == 0, allowed.stderr
        assert allowed.stdout == "pong\n"
