"""Capture plumbing that opens no socket, for driving the supervisor core in-process.

The supervisor takes its capture plumbing explicitly (production passes the kernel one), so a
core built without one cannot pass for a working daemon; harness tests pass this one instead.
"""

from __future__ import annotations

import trio

from mcrelay.ipc.vocabulary import RuleState
from mcrelay.rules import Rule
from mcrelay.supervisor.slot import WorkerSlot


class NoCaptures:
    """Rules are tracked and acknowledged by the (fake) workers; no socket is opened."""

    async def rules_changed(self, rules: tuple[Rule, ...]) -> None:
        return None

    async def worker_starting(self, worker: WorkerSlot, rules: tuple[Rule, ...]) -> None:
        return None

    def worker_gone(self, worker_id: str, pid: int) -> None:
        return None

    def worker_delayed(self, worker_id: str, delay: float) -> int:
        return 0

    def rule_state(self, rule: Rule) -> RuleState:
        return RuleState.ACTIVE

    async def run(self) -> None:
        await trio.sleep_forever()

    def close(self) -> None:
        return None
