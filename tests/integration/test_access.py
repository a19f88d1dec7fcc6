"""Who may use the control socket: file mode, --socket-group, --read-group, SO_PEERCRED behind
them, and connection caps per uid that keep connections for root."""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.daemon import as_user_argv, cli_as, daemon, wait_for

OTHER = pwd.getpwnam("daemon")  # an unprivileged user that exists on every Debian system


def as_user(user: pwd.struct_passwd, socket: Path) -> subprocess.CompletedProcess[str]:
    return cli_as(user.pw_uid, user.pw_gid, "ping", "--socket", str(socket))


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to act as other users)")


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


# --- roles: a read-only group -----------------------------------------------------------------

READER_UID, STRANGER_UID = 61001, 61002  # uids with no passwd entry: only what we give them


def as_uid(
    uid: int, groups: list[int], socket: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return cli_as(uid, uid, *args, "--socket", str(socket), groups=groups)


ADD = ["add", "--input-interface", "in0", "--input-group", "239.1.1.1", "--input-port", "5000",
       "--output", "239.2.2.2:5000:out0"]  # fmt: skip


def test_read_group_reads_and_cannot_change(open_dir: Path) -> None:
    operators, readers = grp.getgrgid(OTHER.pw_gid), grp.getgrnam("bin")
    with daemon(open_dir, "--num-workers", "1", "--socket-group", operators.gr_name,
                "--read-group", readers.gr_name) as d:  # fmt: skip
        d.wait_running()
        # One group owns a file: the socket is open to all and SO_PEERCRED decides.
        assert stat.S_IMODE(d.socket.stat().st_mode) == 0o666
        rid = d.ok(*ADD).strip()
        for command in (["ping"], ["workers"], ["rules"], ["stats"], ["log-level"]):
            read = as_uid(READER_UID, [readers.gr_gid], d.socket, *command)
            assert read.returncode == 0, (command, read.stderr)
        assert rid in as_uid(READER_UID, [readers.gr_gid], d.socket, "rules").stdout
        for change in (["remove", rid], ["log-level", "debug"], ["restart-worker", "data-0"]):
            refused = as_uid(READER_UID, [readers.gr_gid], d.socket, *change)
            assert refused.returncode == 1
            assert refused.stderr.startswith(
                f"mcrelay: permission denied: uid {READER_UID} may only read (the read group, "
                f"gid {readers.gr_gid}); "
            ), refused.stderr
            assert refused.stderr.count("\n") == 1
        added = as_uid(READER_UID, [readers.gr_gid], d.socket, *ADD[:-1], "239.2.2.3:5000:out0")
        assert added.returncode == 1 and "add needs root or the socket's group" in added.stderr
        assert [r["id"] for r in json.loads(d.ok("rules", "--json"))] == [rid]  # unchanged
        assert d.ok("log-level") == "info\n"
        stranger = as_uid(STRANGER_UID, [], d.socket, "stats")
        assert stranger.returncode == 1
        assert stranger.stderr == (
            f"mcrelay: permission denied: uid {STRANGER_UID} is neither root nor in the socket's "
            f"group (gid {operators.gr_gid}) nor the read group (gid {readers.gr_gid})\n"
        )
        # The socket's group still changes rules.
        operator = as_uid(OTHER.pw_uid, [operators.gr_gid], d.socket, "remove", rid)
        assert operator.returncode == 0, operator.stderr


# --- connection caps per uid, with connections kept for root ----------------------------------

HOLD = r"""
import socket, struct, sys
import msgspec
from mcrelay.ipc import messages as m
path, n = sys.argv[1], int(sys.argv[2])
hello = msgspec.msgpack.encode(m.Hello(version=m.PROTOCOL_VERSION, role="client"))
decoder = msgspec.msgpack.Decoder(m.ServerToClient)
def admitted(s):
    try:
        s.sendall(struct.pack("!I", len(hello)) + hello)
        head = s.recv(4, socket.MSG_WAITALL)
        if len(head) < 4:
            return False
        body = s.recv(struct.unpack("!I", head)[0], socket.MSG_WAITALL)
        return isinstance(decoder.decode(body), m.Hello)
    except OSError:
        return False
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    (held.append(s) if admitted(s) else s.close())
print(len(held), flush=True)
sys.stdin.read()  # hold them until the test closes stdin
"""


def test_one_uid_cannot_take_every_connection_and_root_keeps_its_own(open_dir: Path) -> None:
    from mcrelay.worker.control import ADMIN_RESERVED, MAX_CLIENTS, MAX_CLIENTS_PER_UID

    group = OTHER.pw_gid
    with daemon(open_dir, "--num-workers", "1", "--socket-group", grp.getgrgid(group).gr_name) as d:
        d.wait_running()
        holders: list[subprocess.Popen[str]] = []
        try:
            admitted = []
            # Every uid asks for more than its share, one after the other, until the non-root
            # part of the table is full (8 x 64 asked for, 512 - 16 available).
            for i in range(MAX_CLIENTS // MAX_CLIENTS_PER_UID):
                uid = 61100 + i
                holder = subprocess.Popen(
                    as_user_argv(uid, uid, [group], HOLD, str(d.socket),
                                 str(MAX_CLIENTS_PER_UID + 4)),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
                )  # fmt: skip
                holders.append(holder)
                assert holder.stdout is not None
                admitted.append(int(holder.stdout.readline()))
            print(f"\nconnections admitted per uid: {admitted}")
            assert admitted[0] == MAX_CLIENTS_PER_UID  # its own cap
            assert sum(admitted) == MAX_CLIENTS - ADMIN_RESERVED  # all but root's
            # Root (the daemon's user) is still served, several times over.
            for _ in range(3):
                assert d.ok("ping") == "pong\n"
            refused = as_user(OTHER, d.socket)  # a group member finds no room
            assert refused.returncode == 1
            assert "closed the connection" in refused.stderr
            assert (
                f"uid {OTHER.pw_uid}: {MAX_CLIENTS - ADMIN_RESERVED} clients already connected "
                f"(the last {ADMIN_RESERVED} of {MAX_CLIENTS} are kept for root)"
                in d.log.read_text()
            )
        finally:
            for holder in holders:
                holder.communicate(timeout=10)
        # The connections are given back: the group member is served again.
        wait_for(lambda: as_user(OTHER, d.socket).returncode == 0, timeout=10)
