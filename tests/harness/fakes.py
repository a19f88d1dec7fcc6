"""Fake worker processes: real socketpairs, the real worker message loop, no real process."""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from mcrelay.errors import ChannelClosed
from mcrelay.ipc import messages as m
from mcrelay.ipc.framing import FrameChannel
from mcrelay.supervisor.launcher import WorkerSpec
from mcrelay.worker.data import DataWorker
from mcrelay.worker.main import obey

#: A fake worker's body: returns its exit status.
Behaviour = Callable[[FrameChannel, "FakeWorker"], Awaitable[int]]

_pids = itertools.count(10_000)


async def _greet(channel: FrameChannel, worker: FakeWorker) -> None:
    await channel.receive()
    await channel.send(
        m.Hello(version=m.PROTOCOL_VERSION, role=worker.spec.kind, worker_id=worker.spec.worker_id)
    )


async def healthy(channel: FrameChannel, worker: FakeWorker) -> int:
    """The real data worker loop: acks rules, answers heartbeats, exits 0 on Stop."""
    return await _serve(channel, worker)


async def _serve(
    channel: FrameChannel, worker: FakeWorker, adapt: Callable[[DataWorker], None] | None = None
) -> int:
    """`healthy`, with the data worker changed by ``adapt`` before it serves."""
    await _greet(channel, worker)
    data = DataWorker(channel, worker.spec.worker_id)
    worker.impl = data
    if adapt is not None:
        adapt(data)
    try:
        async with trio.open_nursery() as nursery:
            await data.run(nursery)
            await obey(channel, data, hang=False)
            nursery.cancel_scope.cancel()
    finally:
        data.close()
    return 0


async def crash_on_start(channel: FrameChannel, worker: FakeWorker) -> int:
    return 3


def run_for(seconds: float, status: int = 1) -> Behaviour:
    """Healthy for ``seconds``, then exits with ``status``."""

    async def behaviour(channel: FrameChannel, worker: FakeWorker) -> int:
        with trio.move_on_after(seconds):
            await healthy(channel, worker)
        return status

    return behaviour


def exit_unreported(seconds: float = math.inf) -> Behaviour:
    """Healthy for ``seconds`` (or until told to stop), then gone with no exit status known, as
    a worker is when its spawner died before it."""

    async def behaviour(channel: FrameChannel, worker: FakeWorker) -> int:
        worker.status_unknown = True
        with trio.move_on_after(seconds):
            return await healthy(channel, worker)
        return 1

    return behaviour


def hang_after(seconds: float) -> Behaviour:
    """Healthy, then stops answering anything (but does not exit) after ``seconds``."""

    async def behaviour(channel: FrameChannel, worker: FakeWorker) -> int:
        with trio.move_on_after(seconds):
            await healthy(channel, worker)
        worker.hung_at = trio.current_time()
        await trio.sleep_forever()
        return 0

    return behaviour


def slow_rules(seconds: float) -> Behaviour:
    """Healthy, but every rule update after the first set keeps its message loop busy for
    ``seconds`` before it is acknowledged (as a large table does): heartbeats wait behind it."""

    def slowed(data: DataWorker) -> None:
        real_handle = data.handle

        async def handle(message: object) -> None:
            if isinstance(message, m.RuleUpdate):
                await trio.sleep(seconds)
            await real_handle(message)

        data.handle = handle  # type: ignore[method-assign]

    async def behaviour(channel: FrameChannel, worker: FakeWorker) -> int:
        return await _serve(channel, worker, slowed)

    return behaviour


def wrong_digest_once() -> Behaviour:
    """Acknowledges its first rule update with a wrong digest, then behaves."""

    async def behaviour(channel: FrameChannel, worker: FakeWorker) -> int:
        real_send = channel.send
        lied = False

        async def send(message: object, fds: list[int] | None = None) -> None:
            nonlocal lied
            if isinstance(message, m.RuleAck) and message.seq > 0 and not lied:
                lied = True
                worker.lies += 1
                message = m.RuleAck(seq=message.seq, count=message.count, digest="0" * 16)
            await real_send(message, fds)

        channel.send = send  # type: ignore[method-assign]
        return await healthy(channel, worker)

    return behaviour


@dataclass
class FakeWorker:
    spec: WorkerSpec
    channel: FrameChannel
    pid: int
    started_at: float
    done: trio.Event = field(default_factory=trio.Event)
    status: int | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    impl: DataWorker | None = None
    hung_at: float | None = None
    killed_at: float | None = None
    lies: int = 0
    #: Its exit is seen but its status never told (the spawner died first): wait gives None.
    status_unknown: bool = False

    async def wait(self) -> int | None:
        await self.done.wait()
        assert self.status is not None
        return None if self.status_unknown else self.status

    def kill(self) -> None:
        if self.status is None and self.killed_at is None:
            self.killed_at = trio.current_time()
            self.scope.cancel()

    def close(self) -> None:
        self.channel.close()


class FakeLauncher:
    """Launches fake workers into ``nursery``; per worker id, a queue of behaviours."""

    def __init__(self, nursery: trio.Nursery, default: Behaviour = healthy) -> None:
        self._nursery = nursery
        self._default = default
        self.scripts: dict[str, list[Behaviour]] = {}
        self.launched: list[FakeWorker] = []

    def script(self, worker_id: str, *behaviours: Behaviour) -> None:
        self.scripts.setdefault(worker_id, []).extend(behaviours)

    def of(self, worker_id: str) -> list[FakeWorker]:
        return [w for w in self.launched if w.spec.worker_id == worker_id]

    async def launch(self, spec: WorkerSpec) -> FakeWorker:
        ours, theirs = trio.socket.socketpair()
        queue = self.scripts.get(spec.worker_id) or []
        behaviour = queue.pop(0) if queue else self._default
        worker = FakeWorker(
            spec=spec,
            channel=FrameChannel(ours, m.WorkerToSupervisor),
            pid=next(_pids),
            started_at=trio.current_time(),
        )
        self.launched.append(worker)
        self._nursery.start_soon(self._body, worker, behaviour, theirs)
        return worker

    async def _body(
        self, worker: FakeWorker, behaviour: Behaviour, sock: trio.socket.SocketType
    ) -> None:
        channel = FrameChannel(sock, m.SupervisorToWorker)
        status = -9
        with worker.scope:
            try:
                status = await behaviour(channel, worker)
            except ChannelClosed:
                status = 0
        channel.close()
        worker.status = status
        worker.done.set()
