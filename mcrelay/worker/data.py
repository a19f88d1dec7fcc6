"""The data-plane worker: holds the rule set the supervisor gave it and relays packets."""

from __future__ import annotations

import logging
from typing import Any

import trio

from mcrelay import rules as rules_mod
from mcrelay.ipc import messages as m
from mcrelay.ipc.framing import FrameChannel
from mcrelay.rules import Rule

log = logging.getLogger("mcrelay.data")


class DataWorker:
    def __init__(self, channel: FrameChannel, worker_id: str) -> None:
        self._channel = channel
        self.worker_id = worker_id
        self.rules: dict[str, Rule] = {}

    async def run(self, nursery: trio.Nursery) -> None:
        return None

    async def handle(self, message: Any) -> None:
        match message:
            case m.RuleSync(seq=seq, rules=new_rules):
                self.rules = {r.id: r for r in new_rules}
                await self._rules_changed(seq)
            case m.RuleUpdate(seq=seq, added=added, removed=removed):
                for rule_id in removed:
                    self.rules.pop(rule_id, None)
                for rule in added:
                    self.rules[rule.id] = rule
                await self._rules_changed(seq)
            case _:
                log.warning("unexpected %s from the supervisor", type(message).__name__)

    async def _rules_changed(self, seq: int) -> None:
        await self._channel.send(
            m.RuleAck(seq=seq, count=len(self.rules), digest=rules_mod.digest(self.rules.values()))
        )
