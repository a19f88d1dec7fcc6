"""Deadlines on worker channels under a fake clock: a worker that stops reading is killed at the
send deadline, the rule-change lock is never held longer, and a late change is never made."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import trio
import trio.lowlevel

from mcrelay.ipc import messages as m
from mcrelay.rules import Output, make_rule
from mcrelay.supervisor.control_role import CHANGE_START_LIMIT
from mcrelay.supervisor.states import WorkerState
from tests.harness import fakes
from tests.harness.test_lifecycle import SETTINGS, rule, running


def big_load(n: int = 2200) -> m.ReplaceRules:
    """About 1 MiB: far more than a socketpair buffers for a worker that does not read."""
    return m.ReplaceRules(
        rules=tuple(
            make_rule(
                interface="in0",
                group=f"10.50.{k // 250}.{k % 250 + 1}",
                port=7000,
                outputs=[Output("239.78.0.1", 7000 + j, "out0") for j in range(8)],
            )
            for k in range(n)
        )
    )


async def test_worker_that_stops_reading_is_killed_at_the_send_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    settings = dataclasses.replace(SETTINGS, num_workers=2)
    script = {"data-0": [fakes.hang_after(5.0)]}
    async with running(settings, script=script) as (sup, launcher):
        await sup.wait_all_running()
        await trio.sleep(5.1 - trio.current_time())
        started = trio.current_time()
        reply = await sup.execute(big_load())
        took = trio.current_time() - started
        assert reply.ok
        stuck = launcher.of("data-0")[0]
        # The 1 MiB update cannot go in: data-0 is killed at the deadline (the heartbeat
        # timeout, 3 s), not left "running"; data-1 took the update meanwhile.
        assert stuck.killed_at is not None and stuck.killed_at - started <= 3.0
        assert took <= settings.heartbeat_timeout + settings.ack_timeout
        assert sup.data.sync["data-1"].acked_seq.value == sup.table.seq
        # The lock is free: the next change is made at once.
        t = trio.current_time()
        assert (await sup.execute(rule(1))).ok
        assert trio.current_time() - t < 0.1
        slot = sup.slots["data-0"]
        await sup.data.sync[slot.id].acked_seq.wait_value(lambda v: v >= sup.table.seq)
        replacement = launcher.of("data-0")[1]
        assert replacement.impl is not None and len(replacement.impl.rules) == len(sup.table)


async def test_heartbeat_behind_a_blocked_push_still_times_out(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A long send deadline cannot hold off the heartbeat timeout (the send is inside it), nor
    # can the rules the worker owes an acknowledgement for extend it past the general one.
    settings = dataclasses.replace(
        SETTINGS, heartbeat_timeout=3.0, data_heartbeat_timeout=3.0, ack_timeout=2.0
    )
    async with running(settings, script={"data-0": [fakes.hang_after(5.0)]}) as (sup, launcher):
        await sup.wait_all_running()
        await trio.sleep(5.5 - trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.execute, big_load())
            await sup.slots["data-0"].state.wait_value(WorkerState.BACKOFF)
        stuck = launcher.of("data-0")[0]
        # Heartbeat at 6 s (queued behind the update sent at 5.5 s): killed by 5.5 + 3 s.
        assert stuck.killed_at is not None and stuck.killed_at <= 8.5


async def test_a_change_that_cannot_begin_in_time_is_refused_and_never_made(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running() as (sup, _):
        await sup.wait_all_running()
        before = sup.table.seq
        done = trio.Event()

        async def other_change(task_status: trio.TaskStatus[None]) -> None:
            async with sup.changes:  # holds the table longer than the limit
                task_status.started()
                await done.wait()

        async with trio.open_nursery() as nursery:
            await nursery.start(other_change)
            t0 = trio.current_time()
            reply = await sup.execute(rule(1), start_by=t0 + CHANGE_START_LIMIT)
            assert trio.current_time() - t0 == CHANGE_START_LIMIT
            done.set()
        assert not reply.ok
        assert reply.error is not None and "nothing changed" in reply.error
        await trio.sleep(30)
        assert sup.table.seq == before and len(sup.table) == 0


async def test_stop_is_ordered_and_bounded_with_a_stuck_worker(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A heartbeat timeout longer than the test, so the stop is what meets the stuck worker.
    settings = dataclasses.replace(SETTINGS, num_workers=2, data_heartbeat_timeout=3.0)
    async with running(settings, script={"data-0": [fakes.hang_after(2.0)]}) as (sup, launcher):
        await sup.wait_all_running()
        await trio.sleep(2.5 - trio.current_time())
        t0 = trio.current_time()
        await sup.stop()
        # The stuck one is killed after the stop grace; the healthy one obeyed Stop.
        assert trio.current_time() - t0 == settings.stop_grace
        assert launcher.of("data-0")[0].killed_at == t0 + settings.stop_grace
        assert launcher.of("data-1")[0].status == 0
        await trio.sleep(60)
        assert [len(launcher.of(w)) for w in ("data-0", "data-1")] == [1, 1]
        assert all(s.state.value == WorkerState.EXITED for s in sup.slots.values())


async def test_every_stopped_worker_says_so_even_when_the_supervisor_ends_at_once(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon cancels everything as soon as `stop` returns; a worker stopped while a large
    update was still going to it must be logged as stopped all the same."""
    caplog.set_level(logging.INFO, logger="mcrelay")
    settings = dataclasses.replace(SETTINGS, num_workers=2)
    async with running(settings) as (sup, _):
        await sup.wait_all_running()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.execute, big_load())
            await trio.lowlevel.checkpoint()
            await sup.stop()
            nursery.cancel_scope.cancel()
        # Leaving `running` cancels the supervisor at once, as the daemon does.
    messages = [r.getMessage() for r in caplog.records]
    stopped = {m.split()[1] for m in messages if " stopped: " in m}
    assert stopped == set(sup.slots), caplog.text[-2000:]
