"""The control worker's role: hand it the listening socket, run what it forwards, answer.

The control worker only carries requests; the supervisor carries them out
(`mcrelay.supervisor.requests`), in its own nursery, so a change is never cut off half-way when
the worker that forwarded it dies.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from mcrelay.ipc import messages as m
from mcrelay.supervisor.slot import RuleHoldings, WorkerSlot
from mcrelay.worker.control import REQUEST_TIMEOUT

if TYPE_CHECKING:
    from mcrelay.supervisor.core import Supervisor

log = logging.getLogger("mcrelay.supervisor")

#: A client's rule change that cannot begin within this long after it arrived (other changes
#: hold the table) is refused and never made. Once begun, a change is finished everywhere
#: (every send to a worker has a deadline), normally well within the control worker's
#: REQUEST_TIMEOUT, so a client does not hear "no answer" about a change made after it gave up.
CHANGE_START_LIMIT = REQUEST_TIMEOUT / 2

_CHANGES = (m.AddRule, m.RemoveRule, m.ReplaceRules)


class ControlRole:
    def __init__(self, supervisor: Supervisor, listen_fd: int) -> None:
        self._sup = supervisor
        self._listen_fd = listen_fd

    def starting(self, slot: WorkerSlot) -> None:
        return None

    def holdings(self, slot: WorkerSlot) -> RuleHoldings | None:
        return None  # it holds no rules

    async def provision(self, slot: WorkerSlot) -> None:
        # The supervisor keeps its own copy: connections queue in the backlog while a control
        # worker restarts, and are served by the next one.
        settings = self._sup.settings
        listen = m.ListenSocket(
            owner_uid=os.getuid(), allowed_gid=settings.socket_gid, read_gid=settings.read_gid
        )
        await slot.send_during_provisioning(listen, [self._listen_fd])

    def released(self, slot: WorkerSlot, pid: int) -> None:
        return None

    def delayed(self, slot: WorkerSlot, delay: float) -> None:
        return None

    def owes_ack(self, slot: WorkerSlot) -> bool:
        return False  # it is never sent rules

    async def handle(self, slot: WorkerSlot, message: Any, nursery: trio.Nursery) -> None:
        if isinstance(message, m.ControlRequest):
            # Not in this worker's nursery: a change must not be cut off if this worker dies.
            assert self._sup.requests is not None
            start_by = trio.current_time() + CHANGE_START_LIMIT
            self._sup.requests.start_soon(self._answer, slot, slot.incarnation, message, start_by)
        else:
            log.warning("unexpected %s from %s", type(message).__name__, slot.id)

    async def _answer(
        self, slot: WorkerSlot, incarnation: int, request: m.ControlRequest, start_by: float
    ) -> None:
        reply = await self._sup.execute(request.request, start_by=start_by)
        answer = m.ControlReply(req_id=request.req_id, reply=reply)
        if not await slot.send(answer, incarnation=incarnation):
            self._sup.after_reply.clear()  # they were meant for the worker that is gone
            if reply.ok and isinstance(request.request, _CHANGES):
                log.warning(
                    "%s was made, but the control worker that forwarded it is gone: "
                    "its client was not told",
                    type(request.request).__name__,
                )
            return
        while self._sup.after_reply:
            await self._sup.after_reply.pop(0)()
