"""Starting worker processes through the pre-loaded spawner, and the interface the harness fakes.

The supervisor never forks itself (it runs trio): it starts the spawner (mcrelay.worker.spawner)
from its main thread before its trio loop, and asks it for each worker over a SOCK_SEQPACKET
socket. The spawner's child drops its privileges itself before it receives its channel; the
supervisor gets the child's pid and a pidfd (death is noticed at once, signals cannot hit a
recycled pid) and, later, its exit status. If the spawner dies, its workers die with it
(PDEATHSIG); a new spawner is started and the slots replace their workers as after any crash.
How one spawner process is started, greets and is reaped is `mcrelay.supervisor.spawner_process`;
this module keeps one running, talks to it, and hands out the workers it forks.

A launch that fails for any reason (no spawner, EMFILE, ENOMEM, EAGAIN, a failed fork or
pidfd_open) raises :class:`LaunchError` or OSError: the slot counts it as a failed start and
retries after its backoff. Nothing is left behind: a child nobody can watch is killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Protocol

import trio
import trio_util

from mcrelay.errors import ChannelClosed, McrelayError, ProtocolError
from mcrelay.ipc import spawn as sp
from mcrelay.ipc.framing import FrameChannel
from mcrelay.ipc.messages import WorkerKind, WorkerToSupervisor
from mcrelay.supervisor.spawner_process import SpawnerProcess
from mcrelay.supervisor.worker_users import WorkerUsers
from mcrelay.system.privileges import PrivilegeError, check_supervisor
from mcrelay.worker.faults import faults_for

log = logging.getLogger("mcrelay.supervisor")

#: How long a launch waits for a spawner that is (re)starting, and for one fork.
SPAWNER_WAIT = 5.0
SPAWN_TIMEOUT = 5.0
#: How long the exit status of a dead worker may take to arrive from the spawner.
EXIT_REPORT_TIMEOUT = 2.0
#: Delay before starting a new spawner after one died, doubling up to the maximum.
SPAWNER_RESTART_DELAY = (0.1, 5.0)
UNSAFE_OPTION = "--unsafe-keep-worker-root"


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    kind: WorkerKind
    worker_id: str
    #: CPUs the worker may run on; None leaves placement to the scheduler.
    cpus: frozenset[int] | None = None


class LaunchError(McrelayError):
    """A worker could not be started (the slot retries after its backoff)."""


class Launched(Protocol):
    """A started worker as the supervisor sees it."""

    pid: int
    channel: FrameChannel

    async def wait(self) -> int | None:
        """Wait until the worker has exited; its exit status (-signal if killed), None if no
        one could tell (the spawner that reaped it died first)."""
        ...

    def kill(self) -> None: ...

    def close(self) -> None: ...


class Launcher(Protocol):
    async def launch(self, spec: WorkerSpec) -> Launched: ...


_Reply = tuple[sp.Spawned | sp.SpawnFailed, list[int]]


class _Exit:
    def __init__(self) -> None:
        self.event = trio.Event()
        self.status: int | None = None


class SpawnedWorker:
    """A worker forked by the spawner, watched through the pidfd the spawner passed us."""

    def __init__(
        self, pid: int, pidfd: int, channel: FrameChannel, exit: _Exit, forget: Callable[[], object]
    ) -> None:
        self.pid = pid
        self.channel = channel
        self._pidfd = pidfd
        self._exit = exit
        self._forget = forget
        self._done = False

    async def wait(self) -> int | None:
        if not self._done:
            await trio.lowlevel.wait_readable(self._pidfd)
            with trio.move_on_after(EXIT_REPORT_TIMEOUT):
                await self._exit.event.wait()
            self._done = True
        return self._exit.status

    def kill(self) -> None:
        if not self._done and self._pidfd >= 0:
            # pidfd_send_signal cannot hit a recycled pid.
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        self.channel.close()
        self._forget()
        if self._pidfd >= 0:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1


class SpawnerLauncher:
    """Launches workers through the spawner, and keeps a spawner running."""

    def __init__(self, users: WorkerUsers) -> None:
        self.users = users
        self._current: trio_util.AsyncValue[SpawnerProcess | None] = trio_util.AsyncValue(None)
        self._first: SpawnerProcess | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, trio.MemorySendChannel[_Reply]] = {}
        self._exits: dict[int, _Exit] = {}
        #: Why the spawner last failed to start, so a cause is logged once, not every retry.
        self._start_failure: str | None = None

    # --- the spawner's life -------------------------------------------------------------

    def start(self) -> None:
        """Start the first spawner, before the trio loop; refuse if workers cannot drop root."""
        check_supervisor(switch_user=self.users.data is not None)
        spawner = SpawnerProcess.start(self.users)
        try:
            ready = spawner.wait_ready_blocking()
            self._check(ready)
        except BaseException:
            spawner.close()
            raise
        self._first = spawner

    def close(self) -> None:
        """After the trio loop: a first spawner that never got served is stopped too."""
        spawner, self._first = self._first, None
        if spawner is not None:
            spawner.close()

    def _check(self, ready: sp.Ready) -> None:
        if ready.drop_error is None:
            return
        if not self.users.keep_root:
            raise PrivilegeError(
                f"workers cannot drop their privileges ({ready.drop_error}); pass "
                f"{UNSAFE_OPTION} to run them with root's uid anyway (unsafe)"
            )
        log.warning(
            "UNSAFE: workers run with root's uid (%s, %s given)", ready.drop_error, UNSAFE_OPTION
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the current spawner; start a new one whenever it dies. Runs until cancelled."""
        spawner, self._first = self._first, None
        delay = SPAWNER_RESTART_DELAY[0]
        task_status.started()
        while True:
            if spawner is None:
                spawner = await self._restart()
                if spawner is None:
                    await trio.sleep(delay)
                    delay = min(delay * 2, SPAWNER_RESTART_DELAY[1])
                    continue
            self._current.value = spawner
            started = trio.current_time()
            try:
                reason = await self._serve(spawner)
            finally:
                self._current.value = None
                self._forget_all()
                spawner.close_socket()
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(spawner.reap)
            log.error(
                "the worker spawner (pid %d) went away (%s): its workers die with it; "
                "starting a new one",
                spawner.pid,
                reason,
            )
            spawner = None
            if trio.current_time() - started > 10:
                delay = SPAWNER_RESTART_DELAY[0]
            await trio.sleep(delay)
            delay = min(delay * 2, SPAWNER_RESTART_DELAY[1])

    async def _restart(self) -> SpawnerProcess | None:
        try:
            spawner = SpawnerProcess.start(self.users)
        except OSError as exc:
            self._failed_start(f"cannot start the worker spawner: {exc}")
            return None
        try:
            self._check(await spawner.wait_ready())
        except (OSError, McrelayError, trio.TooSlowError) as exc:
            self._failed_start(f"the worker spawner failed to start: {exc or 'timed out'}")
            spawner.close_socket()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(spawner.reap)
            return None
        except BaseException:
            spawner.close()
            raise
        log.info("worker spawner restarted (pid %d)", spawner.pid)
        self._start_failure = None
        return spawner

    def _failed_start(self, why: str) -> None:
        if why != self._start_failure:
            log.error(
                "%s; retrying every %.0f s at most until it starts", why, SPAWNER_RESTART_DELAY[1]
            )
        self._start_failure = why

    async def _serve(self, spawner: SpawnerProcess) -> str:
        """Dispatch the spawner's messages until it goes away; why it did."""
        while True:
            try:
                data, ancdata, flags, _ = await spawner.tsock.recvmsg(
                    sp.MAX_MESSAGE, sp.ancillary_space(1)
                )
                try:
                    payload, fds = sp.unpack(data, ancdata, flags)
                except sp.DescriptorsLost as lost:
                    payload, fds = lost.data, []
                    message = sp.decode_reply(payload)
                    if isinstance(message, sp.Spawned):
                        # Its pidfd is lost: a failed start. Its requester closes our end of
                        # its channel, so the child exits by itself and is reported Exited.
                        message = sp.SpawnFailed(id=message.id, error=str(lost))
                else:
                    message = sp.decode_reply(payload)
            except ChannelClosed:
                return "its socket closed"
            except (OSError, ProtocolError) as exc:
                return str(exc)
            match message:
                case sp.Exited(pid=pid, status=status):
                    record = self._exits.get(pid)
                    if record is not None:
                        record.status = status
                        record.event.set()
                case sp.Spawned() | sp.SpawnFailed():
                    self._deliver(message, fds)
                case _:
                    for fd in fds:
                        os.close(fd)

    def _deliver(self, message: sp.Spawned | sp.SpawnFailed, fds: list[int]) -> None:
        reply = self._replies.pop(message.id, None)
        if isinstance(message, sp.Spawned):
            self._exits.setdefault(message.pid, _Exit())
        if reply is not None:
            try:
                reply.send_nowait((message, fds))
                return
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        # Its requester gave up: never leave the child behind.
        if isinstance(message, sp.Spawned):
            self._exits.pop(message.pid, None)
        _discard(message, fds)

    def _forget_all(self) -> None:
        """The spawner is gone: no reply or exit status will come from it."""
        for reply in self._replies.values():
            reply.close()
        self._replies.clear()
        for record in self._exits.values():
            record.event.set()
        self._exits.clear()

    # --- launching ------------------------------------------------------------------------

    async def launch(self, spec: WorkerSpec) -> SpawnedWorker:
        with trio.move_on_after(SPAWNER_WAIT):
            spawner = await self._current.wait_value(lambda s: s is not None)
        if self._current.value is None:
            raise LaunchError("no worker spawner is running (it is being restarted)")
        assert spawner is not None
        request = sp.Spawn(
            id=next(self._ids),
            kind=spec.kind,
            worker_id=spec.worker_id,
            cpus=tuple(sorted(spec.cpus or ())),
            faults=tuple(sorted(faults_for(spec.kind))),  # the worker may not read the file
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            message, fds = await self._ask(spawner, request, theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if isinstance(message, sp.SpawnFailed):
            ours.close()
            raise LaunchError(f"the spawner could not start it: {message.error}")
        if len(fds) != 1:
            ours.close()
            _discard(message, fds)
            raise LaunchError("the spawner sent no pidfd")
        pid = message.pid
        exit = self._exits.setdefault(pid, _Exit())
        ours.setblocking(False)
        # Workers never pass descriptors up: one that tries is broken or taken over.
        channel = FrameChannel(
            trio.socket.from_stdlib_socket(ours), WorkerToSupervisor, accept_fds=False
        )
        return SpawnedWorker(pid, fds[0], channel, exit, lambda: self._exits.pop(pid, None))

    async def _ask(self, spawner: SpawnerProcess, request: sp.Spawn, fd: int) -> _Reply:
        send, receive = trio.open_memory_channel[_Reply](1)
        async with spawner.lock:
            request_id = request.id
            self._replies[request_id] = send
            try:
                with trio.fail_after(SPAWN_TIMEOUT):
                    await spawner.tsock.sendmsg([sp.encode(request)], sp.rights([fd]))
                    message, fds = await receive.receive()
            except trio.TooSlowError:
                raise LaunchError(
                    f"the spawner did not answer within {SPAWN_TIMEOUT:g} s"
                ) from None
            except trio.EndOfChannel:
                raise LaunchError("the spawner died while starting it") from None
            except OSError as exc:
                raise LaunchError(f"cannot reach the spawner: {exc}") from None
            finally:
                self._replies.pop(request_id, None)
                send.close()
        return message, fds


def _discard(message: sp.FromSpawner, fds: list[int]) -> None:
    for fd in fds:
        if isinstance(message, sp.Spawned):
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.close(fd)
