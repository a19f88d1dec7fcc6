"""Capture filters belong to the supervisor: it attaches and replaces them, the worker never
sets an option on its capture socket.

Evidence from outside the daemon: the test takes a copy of the data worker's capture socket with
``pidfd_getfd`` (root may) and reads its filter back (``SO_GET_FILTER``), and it traces every
``setsockopt`` the worker makes with strace while rules change.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcrelay.dataplane import bpf, bpf_asm
from tests.lab import topology
from tests.lab.daemon import Daemon, daemon, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
]

SO_GET_FILTER = 26
SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Daemon]:
    with topology.namespaces("filter") as created:
        ns = created["filter"]
        ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
        for name in ("d0", "d1"):
            ns.ip("link", "set", name, "up")
        with daemon(tmp_path, "--num-workers", "1", prefix=tuple(ns.cmd())) as d:
            d.wait_running()
            yield d


def add(d: Daemon, group: str, output: str) -> None:
    d.ok("add", "--input-interface", "d0", "--input-group", group, "--input-port", "5000",
         "--output", output, "--id", group)  # fmt: skip


def packet_socket_fds(pid: int) -> list[int]:
    """The worker's descriptors that are AF_PACKET sockets (by inode, from its namespace): a
    capture socket has two, its own and the one Python's mmap keeps for the ring."""
    with open(f"/proc/{pid}/net/packet") as f:
        inodes = {line.split()[-1] for line in f.readlines()[1:]}
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{name}")
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match and match.group(1) in inodes:
            found.append(int(name))
    return found


def steal(pid: int, fd: int) -> socket.socket:
    pidfd = os.pidfd_open(pid)
    try:
        copy = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copy < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd failed")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=copy)


def attached_filter(sock: socket.socket) -> list[bpf.Instruction]:
    length = ctypes.c_uint(0)  # 0: the kernel answers with the number of instructions
    if _libc.getsockopt(
        sock.fileno(), socket.SOL_SOCKET, SO_GET_FILTER, None, ctypes.byref(length)
    ):
        raise OSError(ctypes.get_errno(), "SO_GET_FILTER failed")
    buffer = ctypes.create_string_buffer(8 * length.value)
    if _libc.getsockopt(
        sock.fileno(), socket.SOL_SOCKET, SO_GET_FILTER, buffer, ctypes.byref(length)
    ):
        raise OSError(ctypes.get_errno(), "SO_GET_FILTER failed")
    raw = buffer.raw
    return [bpf_asm.SOCK_FILTER.unpack_from(raw, 8 * i) for i in range(length.value)]


def test_the_supervisor_attaches_and_replaces_the_capture_filter(relay: Daemon) -> None:
    add(relay, "239.1.1.1", "239.2.2.1:5000:d1")
    pid = relay.wait_running()["data-0"]["pid"]
    fds = wait_for(lambda: packet_socket_fds(pid))
    with steal(pid, fds[0]) as sock:
        assert attached_filter(sock) == bpf.compile_filter([("239.1.1.1", 5000)])
        add(relay, "239.1.1.2", "239.2.2.2:5000:d1")
        # Replaced in place: the same socket (and ring) now carries the filter for both rules.
        wanted = bpf.compile_filter([("239.1.1.1", 5000), ("239.1.1.2", 5000)])
        wait_for(lambda: attached_filter(sock) == wanted)
        relay.ok("remove", "239.1.1.1")
        wait_for(lambda: attached_filter(sock) == bpf.compile_filter([("239.1.1.2", 5000)]))
    assert packet_socket_fds(pid) == fds
    assert relay.workers()["data-0"]["restarts"] == 0


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/setup)")
def test_the_data_worker_never_sets_an_option_on_its_capture_socket(
    relay: Daemon, tmp_path: Path
) -> None:
    add(relay, "239.1.1.1", "239.2.2.1:5000:d1")
    pid = relay.wait_running()["data-0"]["pid"]
    captures = wait_for(lambda: packet_socket_fds(pid))
    trace = tmp_path / "strace.out"
    tracer = subprocess.Popen(
        ["strace", "-f", "-e", "trace=setsockopt", "-o", str(trace), "-p", str(pid)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert tracer.stderr is not None
        assert "attached" in tracer.stderr.readline()  # "strace: Process N attached"
        # New rules on the captured interface (the filter changes) with outputs that need new
        # sockets (TTLs not used yet), then removals.
        for i in range(2, 5):
            add(relay, f"239.1.1.{i}", f"239.2.2.{i}:5000:d1:{i}")
        relay.ok("remove", "239.1.1.2")
        relay.ok("remove", "239.1.1.1")
        wait_for(lambda: relay.workers()["data-0"]["rules"] == 2)
    finally:
        tracer.send_signal(signal.SIGINT)  # strace detaches and exits
        tracer.communicate(timeout=10)
    calls = [line for line in trace.read_text().splitlines() if "setsockopt(" in line]
    # The trace works: the worker set options on the output sockets it opened...
    assert any("IP_MULTICAST_TTL" in line for line in calls), calls
    # ...and never on a capture socket, nor any packet or filter option at all.
    on_capture = [c for c in calls if any(f"setsockopt({fd}," in c for fd in captures)]
    assert on_capture == []
    assert not [c for c in calls if re.search(r"SOL_PACKET|SO_ATTACH|SO_DETACH|SO_LOCK", c)]
    assert relay.workers()["data-0"]["restarts"] == 0


def seccomp_mode(pid: int) -> tuple[int, int]:
    """(Seccomp, Seccomp_filters) from /proc/PID/status."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["Seccomp"]), int(fields.get("Seccomp_filters", "0"))


def test_data_workers_forbid_themselves_capture_socket_changes(relay: Daemon) -> None:
    workers = relay.wait_running()
    mode, filters = seccomp_mode(workers["data-0"]["pid"])
    assert mode == 2 and filters >= 1  # SECCOMP_MODE_FILTER
    assert "capture socket options stay changeable" not in relay.log.read_text()


FORBIDDEN = r"""
import os, socket, prctl
from mcrelay.dataplane import bpf
from mcrelay.system import linux, seccomp
capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
bpf.attach(capture, bpf.drop_all())
prctl.set_no_new_privs(True)
seccomp.forbid_capture_changes()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 5)  # what a worker needs still works
udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
attempts = {
    "detach": lambda: capture.setsockopt(socket.SOL_SOCKET, linux.SO_DETACH_FILTER, 0),
    "attach": lambda: bpf.attach(capture, bpf.drop_all()),
    "lock": lambda: capture.setsockopt(socket.SOL_SOCKET, linux.SO_LOCK_FILTER, 1),
    "packet option": lambda: capture.setsockopt(linux.SOL_PACKET, linux.PACKET_IGNORE_OUTGOING, 1),
}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "allowed")
    except PermissionError:
        print(name, "refused")
"""


def test_the_seccomp_filter_refuses_filter_and_packet_options(tmp_path: Path) -> None:
    with topology.namespaces("seccomp") as created:
        ns = created["seccomp"]
        out = ns.run(sys.executable, "-c", FORBIDDEN)
    assert out.splitlines() == [
        "detach refused", "attach refused", "lock refused", "packet option refused",
    ]  # fmt: skip
