"""Supervisor timing logic against fake workers under a fake clock: exact times, no sleeping."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator

import pytest
import trio

from mcrelay.ipc import messages as m
from mcrelay.rules import Output, make_rule
from mcrelay.supervisor.backoff import BackoffPolicy
from mcrelay.supervisor.core import Supervisor
from mcrelay.supervisor.settings import SupervisorSettings
from mcrelay.supervisor.slot import WorkerFatal
from mcrelay.supervisor.states import WorkerState
from tests.harness import fakes
from tests.lab.fake_captures import NoCaptures

SETTINGS = SupervisorSettings(num_workers=1, max_failures=1000)


@contextlib.asynccontextmanager
async def running(
    settings: SupervisorSettings = SETTINGS, script: dict[str, list[fakes.Behaviour]] | None = None
) -> AsyncIterator[tuple[Supervisor, fakes.FakeLauncher]]:
    # Virtual seconds: a stuck test fails here instead of spinning the autojump clock forever.
    with trio.fail_after(600):
        async with trio.open_nursery() as fake_procs:
            launcher = fakes.FakeLauncher(fake_procs)
            for worker_id, behaviours in (script or {}).items():
                launcher.script(worker_id, *behaviours)
            sup = Supervisor(settings, launcher, captures=NoCaptures())
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                yield sup, launcher
                nursery.cancel_scope.cancel()
            fake_procs.cancel_scope.cancel()


def gaps(workers: list[fakes.FakeWorker]) -> list[float]:
    """Time from each worker's death to its successor's start."""
    out = []
    for prev, nxt in itertools.pairwise(workers):
        died = prev.killed_at if prev.killed_at is not None else prev.started_at
        out.append(round(nxt.started_at - died, 6))
    return out


def rule(n: int) -> m.AddRule:
    return m.AddRule(
        rule=make_rule(
            interface="in0",
            group=f"239.1.1.{n}",
            port=5000,
            outputs=[Output("239.9.9.9", 6000 + n, "out0")],
        )
    )


async def test_first_failure_restarts_at_once_then_backoff_doubles_from_250ms_to_16s(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running(script={"data-0": [fakes.crash_on_start] * 9}) as (sup, launcher):
        await trio.sleep(100)
        launched = launcher.of("data-0")
        assert gaps(launched[:10]) == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 16.0]
        assert sup.slots["data-0"].state.value == WorkerState.RUNNING


async def test_stable_run_resets_the_delay(autojump_clock: trio.abc.Clock) -> None:
    script = [fakes.crash_on_start] * 3 + [fakes.run_for(31.0), fakes.crash_on_start]
    async with running(script={"data-0": script}) as (_, launcher):
        await trio.sleep(60)
        launched = launcher.of("data-0")
        starts = [w.started_at for w in launched]
        assert starts[:4] == [0.0, 0.0, 0.25, 0.75]
        # Ran 31 s (past stable_after), then failed: restarted at once, then after 250 ms.
        assert starts[4] == 0.75 + 31.0
        assert starts[5] == starts[4] + 0.25


async def test_restart_worker_cancels_pending_backoff(autojump_clock: trio.abc.Clock) -> None:
    settings = dataclasses.replace(SETTINGS, backoff=BackoffPolicy(initial=10.0, maximum=10.0))
    script = {"data-0": [fakes.crash_on_start] * 2}  # the second failure waits 10 s
    async with running(settings, script=script) as (sup, launcher):
        slot = sup.slots["data-0"]
        await slot.state.wait_value(WorkerState.BACKOFF)
        await trio.sleep(1.0)
        assert slot.describe().backoff_remaining_s == 9.0
        reply = await sup.execute(m.RestartWorker(id="data-0"))
        assert reply.ok
        await slot.state.wait_value(WorkerState.RUNNING)
        assert trio.current_time() == 1.0
        assert [w.started_at for w in launcher.of("data-0")] == [0.0, 0.0, 1.0]


async def test_restart_worker_replaces_a_running_worker_without_counting_a_failure(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running() as (sup, launcher):
        slot = sup.slots["data-0"]
        await slot.state.wait_value(WorkerState.RUNNING)
        await trio.sleep(5)
        await sup.execute(m.RestartWorker(id="data-0"))
        await trio.sleep(1)
        assert [w.started_at for w in launcher.of("data-0")] == [0.0, 5.0]
        assert slot.consecutive_failures == 0
        assert slot.restarts == 1


async def test_unknown_worker_id_is_an_error(autojump_clock: trio.abc.Clock) -> None:
    async with running() as (sup, _):
        reply = await sup.execute(m.RestartWorker(id="data-7"))
        assert not reply.ok
        assert reply.error is not None and "data-0" in reply.error


async def test_hung_data_worker_is_killed_after_its_heartbeat_timeout_and_replaced_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running(script={"data-0": [fakes.hang_after(5.55)]}) as (sup, launcher):
        await trio.sleep(20)
        first, second = launcher.of("data-0")[:2]
        assert first.hung_at == 5.55
        # Beats every 0.1 s: the first one after the hang goes unanswered for 0.3 s, then
        # the read loop gets its short last turn.
        assert first.killed_at == pytest.approx(5.6 + 0.3 + 0.02, abs=1e-6)
        assert second.started_at == first.killed_at  # a first failure: no backoff
        assert sup.slots["data-0"].consecutive_failures == 1


async def test_data_worker_busy_with_rules_it_was_sent_gets_the_general_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running(script={"data-0": [fakes.slow_rules(2.0)]}) as (sup, launcher):
        await sup.wait_all_running()
        assert (await sup.execute(rule(1))).ok  # 2 s installing: no heartbeat answered
        await sup.data.sync["data-0"].acked_seq.wait_value(lambda v: v >= sup.table.seq)
        await trio.sleep(1)
        assert len(launcher.of("data-0")) == 1 and launcher.of("data-0")[0].killed_at is None


async def test_clean_exit_is_not_a_failure(autojump_clock: trio.abc.Clock) -> None:
    script = [fakes.run_for(1.0, status=0)] * 3
    async with running(script={"data-0": script}) as (sup, launcher):
        await trio.sleep(10)
        starts = [w.started_at for w in launcher.of("data-0")]
        assert starts[:4] == [0.0, 1.25, 2.5, 3.75]
        assert sup.slots["data-0"].intensity.recent(trio.current_time()) == 0


async def test_restart_intensity_marks_fatal_and_keeps_retrying(
    autojump_clock: trio.abc.Clock,
) -> None:
    settings = dataclasses.replace(SETTINGS, max_failures=3, failure_window=60.0)
    async with running(settings, script={"data-0": [fakes.crash_on_start] * 5}) as (sup, launcher):
        slot = sup.slots["data-0"]
        await slot.state.wait_value(WorkerState.FATAL)
        # The 4th failure (0 + 0.25 + 0.5 s later) exceeds 3 in 60 s; retried at the cap.
        assert trio.current_time() == 0.75
        workers = await sup.execute(m.ListWorkers())
        assert workers.result.workers[0].state == "fatal"
        await slot.state.wait_value(WorkerState.RUNNING)
        assert launcher.of("data-0")[-1].started_at == 0.75 + 16 + 16


async def test_exit_on_fatal_raises(autojump_clock: trio.abc.Clock) -> None:
    settings = dataclasses.replace(SETTINGS, max_failures=2, exit_on_fatal=True)
    with pytest.RaisesGroup(WorkerFatal, flatten_subgroups=True):
        async with running(settings, script={"data-0": [fakes.crash_on_start] * 5}):
            await trio.sleep(100)


async def test_replacement_gets_every_rule_before_running(autojump_clock: trio.abc.Clock) -> None:
    settings = dataclasses.replace(SETTINGS, num_workers=2)
    async with running(settings) as (sup, launcher):
        await sup.wait_all_running()
        for n in (1, 2):
            assert (await sup.execute(rule(n))).ok
        first = launcher.of("data-1")[0]
        first.kill()
        slot = sup.slots["data-1"]
        await slot.state.wait_value(WorkerState.BACKOFF)
        await slot.state.wait_value(WorkerState.RUNNING)
        replacement = launcher.of("data-1")[1]
        assert replacement.impl is not None
        assert sorted(replacement.impl.rules) == sorted(r.id for r in sup.table.rules)
        assert slot.describe().rules == 2
        assert sup.data.sync[slot.id].acked_seq.value == sup.table.seq


async def test_digest_mismatch_triggers_full_resync(autojump_clock: trio.abc.Clock) -> None:
    async with running(script={"data-0": [fakes.wrong_digest_once()]}) as (sup, launcher):
        await sup.wait_all_running()
        assert (await sup.execute(rule(1))).ok
        worker = launcher.of("data-0")[0]
        assert worker.lies == 1
        slot = sup.slots["data-0"]
        await sup.data.sync[slot.id].acked_seq.wait_value(sup.table.seq)
        assert worker.impl is not None and list(worker.impl.rules) == [sup.table.rules[0].id]


async def test_rule_changes_during_startup_are_not_lost(autojump_clock: trio.abc.Clock) -> None:
    async with running() as (sup, launcher):
        # Change the table while data-0 is still starting: it must end up with both rules.
        assert (await sup.execute(rule(1))).ok
        assert (await sup.execute(rule(2))).ok
        await sup.wait_all_running()
        worker = launcher.of("data-0")[0]
        assert worker.impl is not None and len(worker.impl.rules) == 2
        assert sup.data.sync["data-0"].acked_seq.value == sup.table.seq


async def test_a_worker_gone_without_a_known_status_is_restarted(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Its spawner died before reporting the exit: a failure like any other, then a restart,
    never an invalid transition that takes the supervisor down."""
    async with running(script={"data-0": [fakes.exit_unreported(2.0)]}) as (sup, launcher):
        await trio.sleep(5)
        assert len(launcher.of("data-0")) == 2
        assert sup.slots["data-0"].state.value == WorkerState.RUNNING
        assert sup.slots["data-0"].restarts == 1


async def test_stopping_a_worker_whose_status_is_unknown_ends_cleanly(
    autojump_clock: trio.abc.Clock,
) -> None:
    script = {"data-0": [fakes.exit_unreported()], "control": [fakes.exit_unreported()]}
    async with running(script=script) as (sup, _):
        await sup.wait_all_running()
        await sup.stop()
        with trio.fail_after(1):
            for slot in sup.slots.values():
                await slot.state.wait_value(WorkerState.EXITED)
