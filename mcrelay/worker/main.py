"""What every worker does: bind its life to the supervisor, greet it, answer heartbeats, obey."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Protocol

import trio

from mcrelay.errors import ChannelClosed, ProtocolError, describe
from mcrelay.ipc import messages as m
from mcrelay.ipc.framing import FrameChannel
from mcrelay.system.logs import setup_logging
from mcrelay.system.seccomp import SeccompUnavailable, forbid_capture_changes

log = logging.getLogger("mcrelay.worker")

#: How long a stopping worker may spend finishing what it already took on; the supervisor's
#: stop grace (1 s by default) is the hard limit.
DRAIN_GRACE = 0.5


class WorkerImpl(Protocol):
    async def run(self, nursery: trio.Nursery) -> None:
        """Start the worker's own tasks in ``nursery``."""
        ...

    async def handle(self, message: Any) -> None:
        """A message from the supervisor that the common loop does not handle itself."""
        ...

    async def drain(self) -> None:
        """After Stop: finish what was already promised (bounded by the caller)."""
        ...

    def close(self) -> None:
        """Release sockets and rings; the worker is exiting."""
        ...


def run(kind: m.WorkerKind, worker_id: str, fd: int, faults: frozenset[str]) -> int:
    """The worker's life after the spawner forked it and it dropped its privileges; its exit
    status. ``fd`` is its end of the channel to the supervisor."""
    name = process_name(kind, worker_id)
    setup_logging("info", name)
    if kind == "data":
        try:  # capture sockets' filters and ring are the supervisor's
            forbid_capture_changes()
        except SeccompUnavailable as exc:
            log.warning("capture socket options stay changeable by this worker: %s", exc)
    if "crash-on-start" in faults:
        log.error("fault injected: crash-on-start")
        return 3
    try:
        return trio.run(_run, kind, worker_id, fd, faults)
    except KeyboardInterrupt:
        return 0


async def _run(kind: m.WorkerKind, worker_id: str, fd: int, faults: frozenset[str]) -> int:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    channel = FrameChannel(trio.socket.from_stdlib_socket(sock), m.SupervisorToWorker)
    code = 0
    try:
        hello = await channel.receive()
        if not isinstance(hello, m.Hello) or hello.version != m.PROTOCOL_VERSION:
            got = hello.version if isinstance(hello, m.Hello) else type(hello).__name__
            log.error("supervisor speaks protocol %s, this worker %d", got, m.PROTOCOL_VERSION)
            return 2
        setup_logging(hello.log_level, process_name(kind, worker_id))
        await channel.send(
            m.Hello(version=m.PROTOCOL_VERSION, role=kind, worker_id=worker_id, pid=os.getpid())
        )
        impl = _make_impl(kind, worker_id, channel, faults)
        try:
            async with trio.open_nursery() as nursery:
                await impl.run(nursery)
                await obey(channel, impl, "hang" in faults)
                with trio.move_on_after(DRAIN_GRACE):
                    await impl.drain()
                nursery.cancel_scope.cancel()
        finally:
            impl.close()
    # except*: these may come out of the nursery wrapped in an exception group.
    except* ChannelClosed:
        log.info("supervisor went away: exiting")
    except* ProtocolError as group:
        log.error("protocol error from supervisor: %s", describe(group))
        code = 2
    finally:
        channel.close()
    return code


def process_name(kind: str, worker_id: str) -> str:
    return "mcrelay: control" if kind == "control" else f"mcrelay: {worker_id}"


def _make_impl(
    kind: m.WorkerKind, worker_id: str, channel: FrameChannel, faults: frozenset[str]
) -> WorkerImpl:
    if kind == "control":
        from mcrelay.worker.control import ControlWorker

        return ControlWorker(channel)
    from mcrelay.worker.data import DataWorker

    return DataWorker(channel, worker_id, faults)


async def obey(channel: FrameChannel, impl: WorkerImpl, hang: bool) -> None:
    """The supervisor's messages, in order, until it says Stop.

    Public because it is the worker's whole message loop: the test harness's fake workers run
    this same loop over a socketpair instead of copying it."""
    while True:
        message = await channel.receive()
        match message:
            case m.Heartbeat(n=n):
                if hang:
                    log.error("fault injected: hang")
                    while True:  # deliberately blocks the whole process, as a real hang would
                        time.sleep(3600)  # noqa: ASYNC251
                await channel.send(m.HeartbeatAck(n=n))
            case m.SetLogLevel(level=level):
                logging.getLogger("mcrelay").setLevel(level.upper())
            case m.Stop():
                return
            case _:
                await impl.handle(message)
