"""One worker-spawner process: who its workers run as, starting it, its Ready, reaping it.

The supervisor never forks itself (it runs trio), so every worker comes from the spawner
(mcrelay.worker.spawner), a fresh interpreter started from the supervisor's main thread: its
PDEATHSIG is tied to the thread that forked it, and the main thread lives as long as the
supervisor. `mcrelay.supervisor.launcher` keeps one of these running and asks it for workers;
this module only knows how one spawner process starts, says it is ready and is reaped.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import trio

from mcrelay.errors import ChannelClosed, McrelayError, ProtocolError
from mcrelay.ipc import spawn as sp
from mcrelay.supervisor.worker_users import WorkerUsers

log = logging.getLogger("mcrelay.supervisor")

#: How long a new spawner may take to start its interpreter and import the worker code.
SPAWNER_START_TIMEOUT = 30.0


class SpawnerError(McrelayError):
    """The worker spawner did not start (the launcher retries after a delay)."""


def worker_environment() -> dict[str, str]:
    """The supervisor's environment minus what only the supervisor may use."""
    env = dict(os.environ)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(key, None)
    return env


class SpawnerProcess:
    """One spawner process and our end of its socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.pid = proc.pid
        self.ready: sp.Ready | None = None
        self.lock = trio.Lock()
        self._trio_sock: trio.socket.SocketType | None = None

    @property
    def tsock(self) -> trio.socket.SocketType:
        if self._trio_sock is None:
            self.sock.setblocking(False)
            self._trio_sock = trio.socket.from_stdlib_socket(self.sock)
        return self._trio_sock

    @classmethod
    def start(cls, users: WorkerUsers) -> SpawnerProcess:
        """Fork+exec from the calling (main) thread: PDEATHSIG is tied to the forking thread."""
        from mcrelay.worker.spawner import identity_arg

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [
                sys.executable,
                "-m",
                "mcrelay.worker.spawner",
                "--fd",
                str(theirs.fileno()),
                "--supervisor-pid",
                str(os.getpid()),
                "--control-user",
                identity_arg(users.control),
                "--data-user",
                identity_arg(users.data),
            ]
            if users.keep_root:
                argv.append("--keep-root")
            proc = subprocess.Popen(
                argv,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=worker_environment(),
                cwd="/",
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(proc, ours)

    def wait_ready_blocking(self) -> sp.Ready:
        """Before the trio loop: the spawner's first message."""
        self.sock.settimeout(SPAWNER_START_TIMEOUT)
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(sp.MAX_MESSAGE, sp.ancillary_space(1))
        except TimeoutError:
            raise SpawnerError("the worker spawner did not start in time") from None
        return self._take_ready(data, ancdata, flags)

    async def wait_ready(self) -> sp.Ready:
        with trio.fail_after(SPAWNER_START_TIMEOUT):
            data, ancdata, flags, _ = await self.tsock.recvmsg(
                sp.MAX_MESSAGE, sp.ancillary_space(1)
            )
        return self._take_ready(data, ancdata, flags)

    def _take_ready(
        self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int
    ) -> sp.Ready:
        try:
            payload, fds = sp.unpack(data, ancdata, flags)
        except ChannelClosed:
            raise SpawnerError("the worker spawner exited at start") from None
        for fd in fds:
            os.close(fd)
        ready = sp.decode_reply(payload)
        if not isinstance(ready, sp.Ready):
            raise ProtocolError(f"the spawner said {type(ready).__name__} before Ready")
        self.ready = ready
        return ready

    def close_socket(self) -> None:
        """Close our end: the spawner exits on EOF."""
        if self._trio_sock is not None:
            self._trio_sock.close()
        self.sock.close()

    def reap(self) -> None:
        """Blocking: make sure the spawner is gone, and reap it."""
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.close_socket()
        self.reap()
