"""The data workers' role: what each holds of the rule table, and keeping it in step.

A data worker is trusted no further than its messages. What one acknowledged (seq, digest, rule
count, the rules it could not install) and the resyncs it needed are kept here, one
:class:`WorkerRules` per worker, written only by :class:`DataRole`; `WorkerSlot` knows only the
lifecycle and asks the role for these figures when it is listed.

A starting worker is provisioned in one direction: its counter page, then its capture sockets
(the plumbing sends them), then the whole table, until it acknowledges the current one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio
import trio_util

from mcrelay.errors import ProtocolError
from mcrelay.ipc import messages as m
from mcrelay.rules import Rule
from mcrelay.supervisor.counter_pages import CounterPages
from mcrelay.supervisor.rule_table import RuleTable
from mcrelay.supervisor.slot import RuleHoldings, WorkerSlot
from mcrelay.supervisor.stats import StatsBook

if TYPE_CHECKING:
    from mcrelay.supervisor.core import CapturePlumbing

log = logging.getLogger("mcrelay.supervisor")

#: Full resyncs a worker may need in a row before it counts as broken and is restarted.
MAX_RESYNCS = 3
#: At most one full resync per worker per this many seconds, however many wrong acks arrive.
RESYNC_INTERVAL = 0.5


class ResyncBudget:
    """Full resyncs sent to one worker process since it last agreed with the table."""

    def __init__(self) -> None:
        self.count = 0
        self.pending = False
        self._last: float | None = None

    def schedule(self, now: float, interval: float) -> float | None:
        """Seconds until the next resync may go (counted as one more), or None when one is
        already waiting to go: however many wrong acks arrive, one resync per ``interval``."""
        if self.pending:
            return None
        self.pending = True
        self.count += 1
        return 0.0 if self._last is None else max(0.0, self._last + interval - now)

    def sent(self, now: float) -> None:
        """The resync is being sent: an ack disagreeing after this may schedule the next."""
        self.pending = False
        self._last = now


class WorkerRules:
    """What one data worker holds of the rule table, as its acknowledgements say.

    One per worker slot, kept across its processes (so a wait on `acked_seq` outlives a
    restart): each new process starts from nothing.
    """

    def __init__(self) -> None:
        #: Highest rule-table seq this worker acknowledged with a matching digest.
        self.acked_seq: trio_util.AsyncValue[int] = trio_util.AsyncValue(-1)
        self.rule_count: int | None = None
        #: Digest of the rule set the worker last acknowledged.
        self.rule_digest: str | None = None
        #: Rules the worker holds but could not install (rule id → why), from its last ack.
        self.failed_rules: dict[str, str] = {}
        self.resyncs = ResyncBudget()

    def new_process(self) -> None:
        """A new process starts in the slot: nothing it acknowledged yet, no resync owed."""
        self.rule_digest = None
        self.failed_rules = {}
        self.resyncs = ResyncBudget()

    def provisioning(self) -> None:
        """The process is about to be given the table: no rule count, no seq acknowledged."""
        self.rule_count = None
        self.acked_seq.value = -1

    def holdings(self) -> RuleHoldings:
        return RuleHoldings(self.rule_count, self.rule_digest, len(self.failed_rules))


class DataRole:
    """Provisions data workers, checks their acknowledgements, files their counters."""

    def __init__(
        self,
        worker_ids: Iterable[str],
        table: RuleTable,
        captures: CapturePlumbing,
        stats: StatsBook,
        counter_pages: CounterPages,
    ) -> None:
        self._table = table
        self._captures = captures
        self._stats = stats
        self._counter_pages = counter_pages
        #: Per data worker id, in the order the workers are listed.
        self.sync: dict[str, WorkerRules] = {worker_id: WorkerRules() for worker_id in worker_ids}

    # --- what the core asks ---------------------------------------------------------------

    def failures(self, rule: Rule) -> list[str]:
        """Which workers could not install ``rule``, and why ("data-0: reason")."""
        return [
            f"{worker_id}: {sync.failed_rules[rule.id]}"
            for worker_id, sync in self.sync.items()
            if rule.id in sync.failed_rules
        ]

    async def wait_acked(self, slots: Iterable[WorkerSlot], seq: int) -> None:
        """Until each of ``slots`` has acknowledged the table at ``seq`` (callers bound it)."""
        for slot in slots:
            await self.sync[slot.id].acked_seq.wait_value(lambda v: v >= seq)

    # --- SlotRole -------------------------------------------------------------------------

    def starting(self, slot: WorkerSlot) -> None:
        self.sync[slot.id].new_process()

    def holdings(self, slot: WorkerSlot) -> RuleHoldings:
        return self.sync[slot.id].holdings()

    async def provision(self, slot: WorkerSlot) -> None:
        sync = self.sync[slot.id]
        sync.provisioning()
        await self._send_counter_page(slot)
        table = self._table
        while True:  # the whole table, until the worker acknowledges the current one
            seq, rules = table.seq, table.rules
            await self._captures.worker_starting(slot, rules)
            await slot.send_during_provisioning(m.RuleSync(seq=seq, rules=rules))
            await sync.acked_seq.wait_value(lambda v, seq=seq: v >= seq)
            if table.seq == seq:
                return

    async def _send_counter_page(self, slot: WorkerSlot) -> None:
        """Before any rule: so every count the process makes is in its page."""
        pid = slot.pid
        fd = None if pid is None else self._counter_pages.open(slot.id, pid)
        if fd is None:
            return
        try:
            await slot.send_during_provisioning(m.CounterPage(), [fd])
        finally:
            os.close(fd)

    def delayed(self, slot: WorkerSlot, delay: float) -> None:
        self._stats.retire_kernel_drops(self._captures.worker_delayed(slot.id, delay))

    def owes_ack(self, slot: WorkerSlot) -> bool:
        acked: int = self.sync[slot.id].acked_seq.value
        return acked < self._table.seq

    def released(self, slot: WorkerSlot, pid: int) -> None:
        self._captures.worker_gone(slot.id, pid)
        table = self._table
        try:
            final = self._counter_pages.take(slot.id, pid, table.rules)
        except Exception:  # a bug reading one page must not take the daemon down
            log.exception("reading the counter page of %s (pid %d) failed", slot.id, pid)
            final = None
        lowered = self._stats.retire(slot.id, pid, final, table.by_id)
        if lowered:
            log.warning(
                "worker %s (pid %d) left %d counters in its counter page below what it had "
                "reported: the reported ones are kept",
                slot.id,
                pid,
                lowered,
            )

    async def handle(self, slot: WorkerSlot, message: Any, nursery: trio.Nursery) -> None:
        if isinstance(message, m.RuleAck):
            self._on_ack(slot, message)
        elif isinstance(message, m.StatsReport):
            self._stats.record(slot.id, slot.pid, message, self._table.by_id)
        else:
            log.warning("unexpected %s from %s", type(message).__name__, slot.id)

    # --- acknowledgements -----------------------------------------------------------------

    def _on_ack(self, slot: WorkerSlot, ack: m.RuleAck) -> None:
        """Check a worker's acknowledgement against the table; resync it when it disagrees.

        One that still disagrees after ``MAX_RESYNCS`` full resyncs is broken (restarted, not
        resynced forever), and resyncs are at most one per ``RESYNC_INTERVAL``, however many
        wrong acks arrive.
        """
        sync = self.sync[slot.id]
        table = self._table
        expected = table.digest_at(ack.seq)
        if expected == ack.digest:
            sync.resyncs.count = 0
            sync.rule_count = ack.count
            sync.rule_digest = ack.digest
            self._note_failures(slot.id, sync, ack.failed)
            if ack.seq > sync.acked_seq.value:
                sync.acked_seq.value = ack.seq
            return
        budget = sync.resyncs
        if budget.count >= MAX_RESYNCS and not budget.pending:
            raise ProtocolError(
                f"still holds rule set {ack.digest} at seq {ack.seq} after {MAX_RESYNCS} "
                f"resyncs, expected {expected}"
            )
        delay = budget.schedule(trio.current_time(), RESYNC_INTERVAL)
        if delay is None:
            return  # a resync is already on its way
        log.warning(
            "worker %s holds rule set %s at seq %d, expected %s: resyncing",
            slot.id,
            ack.digest,
            ack.seq,
            expected,
        )

        def resync() -> m.RuleSync:
            budget.sent(trio.current_time())  # from here on, a wrong ack may ask for another
            return m.RuleSync(seq=table.seq, rules=table.rules)

        # In the background: this runs in the worker's read loop, which must not wait.
        slot.post(resync, delay=delay)

    def _note_failures(self, worker_id: str, sync: WorkerRules, failed: dict[str, str]) -> None:
        """Keep what a worker could not install (only rules in the table: a worker's word is
        bounded by it), and say so once per rule and reason."""
        by_id = self._table.by_id
        now = {rule_id: reason for rule_id, reason in failed.items() if rule_id in by_id}
        for rule_id, reason in now.items():
            if sync.failed_rules.get(rule_id) != reason:
                log.error("worker %s cannot install rule %s: %s", worker_id, rule_id, reason)
        for rule_id in sync.failed_rules.keys() - now.keys():
            if rule_id in by_id:
                log.info("worker %s installed rule %s", worker_id, rule_id)
        sync.failed_rules = now
