"""Who the workers run as: resolved once, before the spawner starts, from the user options.

Root's supervisor has each kind of worker run as its own user (the spawner's child switches
before it gets its channel), so the control worker, which talks to clients, and the data workers,
which hold capture sockets, are kept apart by uid; a non-root supervisor keeps its own user.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from mcrelay.system.privileges import (
    DEFAULT_CONTROL_USER,
    DEFAULT_DATA_USER,
    Identity,
    resolve_user,
)

log = logging.getLogger("mcrelay.supervisor")


@dataclasses.dataclass(frozen=True)
class WorkerUsers:
    """Who each kind of worker runs as; None keeps the supervisor's (unprivileged) user."""

    control: Identity | None
    data: Identity | None
    #: Run workers as root if switching users fails (they still lose every capability).
    keep_root: bool = False

    @classmethod
    def resolve(cls, data_user: str, control_user: str, *, keep_root: bool) -> WorkerUsers:
        if os.geteuid() != 0:
            return cls(None, None, keep_root)
        data = resolve_user(data_user, default=data_user == DEFAULT_DATA_USER)
        control = resolve_user(control_user, default=control_user == DEFAULT_CONTROL_USER)
        if data.uid == control.uid:
            log.warning(
                "the control and data workers share uid %d: they cannot ptrace each other "
                "(not dumpable) but can signal each other",
                data.uid,
            )
        return cls(control, data, keep_root)
