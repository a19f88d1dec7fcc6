"""Kernel-side plumbing for data workers: capture sockets and group memberships."""

from __future__ import annotations

from mcrelay.supervisor.rule_table import RuleTable
from mcrelay.supervisor.slot import WorkerSlot


class KernelDataPlane:
    async def provision(self, slot: WorkerSlot) -> None:
        return None

    async def rules_changed(self, table: RuleTable, slots: list[WorkerSlot]) -> None:
        return None
