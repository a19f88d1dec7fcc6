"""Worker states, named like supervisord's, and the one pure function that moves between them.

The states themselves are the protocol's (`mcrelay.ipc.vocabulary.WorkerState`, re-exported
here): clients, `mcrelay top` and the metrics endpoint read the same names.
"""

from __future__ import annotations

import enum

from mcrelay.ipc.vocabulary import WorkerState

__all__ = ["Event", "InvalidTransition", "WorkerState", "transition"]


class Event(enum.StrEnum):
    SPAWN = "spawn"  # a process was started
    READY = "ready"  # it said hello and acknowledged what it must hold
    DIED = "died"  # it exited (crash, clean exit, or killed as hung)
    DIED_TOO_OFTEN = "died-too-often"  # it exited and exceeded the restart intensity
    STOP = "stop"  # the supervisor is stopping it for good
    STOPPED = "stopped"  # it is gone after a stop


_TRANSITIONS: dict[tuple[WorkerState, Event], WorkerState] = {
    (WorkerState.EXITED, Event.SPAWN): WorkerState.STARTING,
    (WorkerState.BACKOFF, Event.SPAWN): WorkerState.STARTING,
    (WorkerState.FATAL, Event.SPAWN): WorkerState.STARTING,
    (WorkerState.STARTING, Event.READY): WorkerState.RUNNING,
    (WorkerState.STARTING, Event.DIED): WorkerState.BACKOFF,
    (WorkerState.RUNNING, Event.DIED): WorkerState.BACKOFF,
    (WorkerState.STARTING, Event.DIED_TOO_OFTEN): WorkerState.FATAL,
    (WorkerState.RUNNING, Event.DIED_TOO_OFTEN): WorkerState.FATAL,
    (WorkerState.STOPPING, Event.STOPPED): WorkerState.EXITED,
    (WorkerState.STOPPING, Event.DIED): WorkerState.EXITED,
    (WorkerState.STOPPING, Event.DIED_TOO_OFTEN): WorkerState.EXITED,
}


class InvalidTransition(Exception):
    pass


def transition(state: WorkerState, event: Event) -> WorkerState:
    """The next state; STOP is accepted from anywhere, anything unlisted is a bug."""
    if event is Event.STOP:
        return WorkerState.STOPPING
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"{event} is not valid in state {state}") from None
