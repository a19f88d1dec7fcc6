"""Backoff policy, restart intensity and the state machine: pure, exhaustive."""

from __future__ import annotations

import pytest

from mcrelay.supervisor.backoff import BackoffPolicy, RestartIntensity
from mcrelay.supervisor.states import Event, InvalidTransition, WorkerState, transition


def test_backoff_sequence() -> None:
    policy = BackoffPolicy()
    assert [policy.delay(n) for n in range(1, 11)] == [
        0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0,
    ]  # fmt: skip
    assert policy.delay(10_000) == 16.0


def test_intensity_window() -> None:
    intensity = RestartIntensity(max_failures=2, window=10)
    assert not intensity.record(0)
    assert not intensity.record(1)
    assert intensity.record(2)
    assert not intensity.exceeded(11.5)  # the first two fell out of the window
    assert intensity.recent(11.5) == 1


def test_transitions() -> None:
    s = WorkerState.EXITED
    for event, expected in [
        (Event.SPAWN, WorkerState.STARTING),
        (Event.READY, WorkerState.RUNNING),
        (Event.DIED, WorkerState.BACKOFF),
        (Event.SPAWN, WorkerState.STARTING),
        (Event.DIED_TOO_OFTEN, WorkerState.FATAL),
        (Event.SPAWN, WorkerState.STARTING),
        (Event.STOP, WorkerState.STOPPING),
        (Event.STOPPED, WorkerState.EXITED),
    ]:
        s = transition(s, event)
        assert s is expected


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (WorkerState.RUNNING, Event.SPAWN),
        (WorkerState.EXITED, Event.READY),
        (WorkerState.BACKOFF, Event.DIED),
    ],
)
def test_invalid_transitions(state: WorkerState, event: Event) -> None:
    with pytest.raises(InvalidTransition):
        transition(state, event)
