"""A real supervisor subprocess on a temporary control socket, ended by PID however a test ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mcrelay import client
from mcrelay.ipc import messages as m

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout: float = 5.0, interval: float = 0.02) -> T:
    """Poll until ``predicate`` returns something truthy; fail clearly at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().startswith("mcrelay: ")
    except FileNotFoundError:
        return False


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcrelay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


#: Runs the CLI as another user from an interpreter only root may be able to read (a clone or a
#: Python under a 0700 directory): everything the command needs is imported first, as root.
_AS_USER = """
import os, sys
import mcrelay.cli, mcrelay.client, mcrelay.ipc.messages, trio
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([]); os.setresgid(gid, gid, gid); os.setresuid(uid, uid, uid)
sys.argv = ["mcrelay", *sys.argv[3:]]
mcrelay.cli.main()
"""


def cli_as(uid: int, gid: int, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``mcrelay ARGS`` as uid/gid (no supplementary groups); needs root."""
    return subprocess.run(
        [sys.executable, "-c", _AS_USER, str(uid), str(gid), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )


class Daemon:
    def __init__(self, socket: Path, proc: subprocess.Popen[str], log: Path) -> None:
        self.socket = socket
        self.proc = proc
        self.log = log
        self.seen_worker_pids: set[int] = set()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--socket", str(self.socket))

    def ok(self, *args: str) -> str:
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr + self.log.read_text()[-3000:]
        return result.stdout

    def workers(self) -> dict[str, dict[str, Any]]:
        """Through the client library: polling must be cheap (the CLI is tested on its own)."""
        found = {w["id"]: w for w in client.call(self.socket, m.ListWorkers(), timeout=10)}
        self.seen_worker_pids.update(w["pid"] for w in found.values() if w["pid"])
        return found

    def wait_running(self, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        def all_running() -> dict[str, dict[str, Any]] | None:
            workers = self.workers()
            if all(w["state"] == "running" and pid_alive(w["pid"]) for w in workers.values()):
                return workers
            return None

        return wait_for(all_running, timeout)

    def wait_replaced(self, worker_id: str, old_pid: int, timeout: float = 10.0) -> dict[str, Any]:
        def replaced() -> dict[str, Any] | None:
            w = self.workers()[worker_id]
            return w if w["state"] == "running" and w["pid"] != old_pid else None

        return wait_for(replaced, timeout)


@contextlib.contextmanager
def daemon(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    ready: bool = True,
) -> Iterator[Daemon]:
    """``prefix`` runs the supervisor through another command (``ip netns exec NS``);
    ``ready=False`` yields at once instead of waiting until the daemon answers."""
    socket = tmp / "control.sock"
    log = tmp / "supervisor.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "mcrelay",
                "supervisor",
                "--control-socket",
                str(socket),
                "--state-dir",
                str(tmp / "state"),
                *args,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
    d = Daemon(socket, proc, log)
    try:
        if ready:
            wait_for(lambda: d.cli("ping").returncode == 0 or proc.poll() is not None, 10)
            assert proc.poll() is None, log.read_text()
        yield d
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in d.seen_worker_pids:  # only workers this test's daemon started
            if pid_alive(pid) and is_worker(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
