"""A data plane that moves no packets, for driving the supervisor core in-process.

The supervisor takes its data plane explicitly (production passes the kernel one), so a core
built without one cannot pass for a working daemon; harness tests pass this one instead.
"""

from __future__ import annotations

import trio

from mcrelay.ipc.vocabulary import RuleState
from mcrelay.rules import Rule
from mcrelay.supervisor.core import Supervisor
from mcrelay.supervisor.rule_table import RuleTable
from mcrelay.supervisor.slot import WorkerSlot


class NoDataPlane:
    """Rules are tracked and acknowledged by the (fake) workers; no socket is opened."""

    async def provision(self, slot: WorkerSlot, table: RuleTable) -> None:
        return None

    async def rules_changed(self, table: RuleTable, slots: list[WorkerSlot]) -> None:
        return None

    def close(self) -> None:
        return None

    def rule_state(self, rule: Rule) -> RuleState:
        return RuleState.ACTIVE

    def worker_gone(self, slot: WorkerSlot, pid: int) -> int:
        return 0

    async def follow_links(self, sup: Supervisor) -> None:
        await trio.sleep_forever()
