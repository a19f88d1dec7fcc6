"""Counter pages: a dead worker's last counts reach `stats`, and garbage in its page does not.

Fake workers run the real data worker, which maps the real memfd the supervisor passed; traffic
is simulated by counting into the worker's route cells, as the relay loop does. The worker's
once-a-second push is the clock: counts are made after a push and the worker is killed before
the next one.
"""

from __future__ import annotations

import msgspec
import trio

from mcrelay.dataplane.relay_loop import Route
from mcrelay.ipc import messages as m
from mcrelay.supervisor.core import Supervisor
from mcrelay.supervisor.states import WorkerState
from mcrelay.worker.data import STATS_INTERVAL, DataWorker
from tests.harness import fakes
from tests.harness.test_lifecycle import rule, running


def _route(impl: DataWorker) -> Route:
    ((_, route),) = impl._routes.values()
    return route


def _count(route: Route, packets: int) -> None:
    """What the relay loop does for ``packets`` datagrams of 100 bytes sent to every output."""
    route.counts[1] += packets
    route.counts[2] += 100 * packets
    for out in route.outputs:
        out.counts[1] += packets
        out.counts[2] += 100 * packets


async def _started(sup: Supervisor, launcher: fakes.FakeLauncher) -> DataWorker:
    await sup.wait_all_running()
    assert (await sup.execute(rule(1))).ok
    impl = launcher.of("data-0")[0].impl
    assert impl is not None and impl._cells.in_page
    return impl


async def _counted(sup: Supervisor) -> tuple[int, int, int]:
    reply = await sup.execute(m.GetStats())
    assert reply.ok
    msgspec.msgpack.encode(reply)  # whatever a worker wrote, the reply encodes
    (stats,) = reply.result.rules
    (out,) = stats.outputs
    return stats.packets_in, out.packets, reply.result.kernel_drops


async def _kill_and_replace(sup: Supervisor, launcher: fakes.FakeLauncher) -> None:
    launcher.of("data-0")[0].kill()
    slot = sup.slots["data-0"]
    await slot.state.wait_value(WorkerState.BACKOFF)
    await slot.state.wait_value(WorkerState.RUNNING)


async def test_a_killed_worker_loses_no_count(autojump_clock: trio.abc.Clock) -> None:
    async with running() as (sup, launcher):
        impl = await _started(sup, launcher)
        _count(_route(impl), 10)
        await trio.sleep(STATS_INTERVAL * 1.5)  # pushed
        assert await _counted(sup) == (10, 10, 0)
        _count(_route(impl), 5)  # after that push: only the page holds these
        await _kill_and_replace(sup, launcher)
        assert await _counted(sup) == (15, 15, 0)
        replacement = launcher.of("data-0")[1].impl
        assert replacement is not None
        _count(_route(replacement), 1)
        await trio.sleep(STATS_INTERVAL * 1.5)
        assert await _counted(sup) == (16, 16, 0)


async def test_garbage_in_a_page_neither_lowers_nor_breaks_stats(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running() as (sup, launcher):
        impl = await _started(sup, launcher)
        route = _route(impl)
        _count(route, 10)
        await trio.sleep(STATS_INTERVAL * 1.5)
        assert await _counted(sup) == (10, 10, 0)
        route.counts[1] = 3  # backwards
        route.outputs[0].counts[1] = 2**64 - 1  # beyond any count
        words = impl._cells._words
        assert words is not None
        words[0] = 2**64 - 1  # cells in use: far more than the page holds
        words[1] = 2**64 - 1  # kernel drops
        await _kill_and_replace(sup, launcher)
        assert await _counted(sup) == (10, 10, 0)
        assert sup.slots["data-0"].restarts == 1
