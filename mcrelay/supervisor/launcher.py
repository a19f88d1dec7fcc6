"""Starting worker processes, and the interface the in-process test harness fakes.

Workers are fresh interpreters (``python -m mcrelay.worker``), never forks of the running trio
process. They are spawned from the supervisor's main thread: PR_SET_PDEATHSIG fires when the
*thread* that forked the child exits, and trio's own process spawning forks from worker threads
that are retired when idle. Each worker gets its own session, so a Ctrl-C on the terminal reaches
only the supervisor, which alone decides when workers stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
from typing import Protocol

import trio

from mcrelay.ipc.framing import FrameChannel
from mcrelay.ipc.messages import WorkerKind, WorkerToSupervisor
from mcrelay.worker.faults import faults_for


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    kind: WorkerKind
    worker_id: str
    #: CPUs the worker may run on; None leaves placement to the scheduler.
    cpus: frozenset[int] | None = None


class Launched(Protocol):
    """A started worker as the supervisor sees it."""

    pid: int
    channel: FrameChannel

    async def wait(self) -> int:
        """Wait until the worker has exited and been reaped; its exit status (-signal if killed)."""
        ...

    def kill(self) -> None: ...

    def close(self) -> None: ...


class Launcher(Protocol):
    def launch(self, spec: WorkerSpec) -> Launched: ...


def worker_environment() -> dict[str, str]:
    """The supervisor's environment minus what only the supervisor may use."""
    env = dict(os.environ)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(key, None)
    return env


class ProcessWorker:
    """A real worker process, watched through a pidfd so death is noticed at once."""

    def __init__(self, proc: subprocess.Popen[bytes], channel: FrameChannel) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.channel = channel
        self._pidfd = os.pidfd_open(proc.pid)
        self._status: int | None = None

    async def wait(self) -> int:
        if self._status is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            self._status = self._proc.wait()
        return self._status

    def kill(self) -> None:
        if self._status is None:
            # pidfd_send_signal cannot hit a recycled pid.
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        self.channel.close()
        if self._pidfd >= 0:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1


class ProcessLauncher:
    """Spawns ``python -m mcrelay.worker KIND ID`` with one end of a fresh socketpair."""

    def __init__(self, identity: tuple[int, int] | None = None) -> None:
        #: (uid, gid) workers run as; None keeps the supervisor's.
        self._identity = identity

    def launch(self, spec: WorkerSpec) -> ProcessWorker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [
                sys.executable,
                "-m",
                "mcrelay.worker",
                spec.kind,
                spec.worker_id,
                "--fd",
                str(theirs.fileno()),
                "--supervisor-pid",
                str(os.getpid()),
            ]
            # The supervisor reads the fault file: a worker may not be allowed to.
            if spec.cpus:  # the worker pins itself: it may, another user's process may not
                argv += ["--cpus", ",".join(map(str, sorted(spec.cpus)))]
            faults = faults_for(spec.kind)
            if faults:
                argv += ["--faults", ",".join(sorted(faults))]
            uid, gid = self._identity or (None, None)
            proc = subprocess.Popen(
                argv,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=worker_environment(),
                cwd="/",
                user=uid,
                group=gid,
                extra_groups=[] if uid is not None else None,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        channel = FrameChannel(trio.socket.from_stdlib_socket(ours), WorkerToSupervisor)
        return ProcessWorker(proc, channel)
