"""The supervisor's core: worker slots, the rule table, and what each control request does.

It knows nothing about signals, sockets on disk or real processes: the launcher and the data-plane
plumbing are injected, so the test harness can drive it with fake workers under a fake clock.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import resource
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, Protocol, TypeVar

import trio
import trio_util

from mcrelay import policy
from mcrelay.errors import McrelayError, ProtocolError, RuleError
from mcrelay.ipc import messages as m
from mcrelay.ipc import replies as r
from mcrelay.ipc.vocabulary import RuleState
from mcrelay.rule_diff import RuleDiff
from mcrelay.rules import Rule
from mcrelay.supervisor import costs
from mcrelay.supervisor.counter_pages import CounterPages
from mcrelay.supervisor.launcher import Launcher, WorkerSpec
from mcrelay.supervisor.memberships import max_memberships_per_socket
from mcrelay.supervisor.persistence import RuleStore, StateNotDurable
from mcrelay.supervisor.precedence import Seed
from mcrelay.supervisor.rule_table import RuleTable
from mcrelay.supervisor.settings import SupervisorSettings
from mcrelay.supervisor.slot import WorkerSlot
from mcrelay.supervisor.states import WorkerState
from mcrelay.supervisor.stats import StatsBook
from mcrelay.system.addresses import host_addresses, is_loopback_interface
from mcrelay.system.logs import check_log_level, set_log_level
from mcrelay.system.netlink import interface_exists
from mcrelay.worker.control import REQUEST_TIMEOUT

log = logging.getLogger("mcrelay.supervisor")
T = TypeVar("T")

#: A client's rule change that cannot begin within this long after it arrived (other changes
#: hold the table) is refused and never made. Once begun, a change is finished everywhere
#: (every send to a worker has a deadline), normally well within the control worker's
#: REQUEST_TIMEOUT, so a client does not hear "no answer" about a change made after it gave up.
CHANGE_START_LIMIT = REQUEST_TIMEOUT / 2

#: Full resyncs a worker may need in a row before it counts as broken and is restarted.
MAX_RESYNCS = 3
#: At most one full resync per worker per this many seconds, however many wrong acks arrive.
RESYNC_INTERVAL = 0.5
_CHANGES = (m.AddRule, m.RemoveRule, m.ReplaceRules)


class DataPlane(Protocol):
    """Kernel-side plumbing for data workers (capture sockets, group memberships)."""

    async def provision(self, slot: WorkerSlot, table: RuleTable) -> None:
        """Send a starting data worker the capture sockets it does not hold yet."""
        ...

    async def rules_changed(self, table: RuleTable, slots: list[WorkerSlot]) -> None:
        """Follow the table: join/leave groups, open/close capture sockets, refresh filters."""
        ...

    def close(self) -> None: ...

    def rule_state(self, rule: Rule) -> RuleState:
        """active, paused (input interface down) or unresolved (no such interface)."""
        ...

    def worker_gone(self, slot: WorkerSlot, pid: int) -> int:
        """Worker process ``pid`` of ``slot`` has been reaped: drop what was held for it, and
        say how many frames its rings dropped since it last read their counters."""
        ...

    async def follow_links(self, sup: Supervisor) -> None:
        """Run for the supervisor's lifetime, following interfaces that come and go."""
        ...


class Supervisor:
    def __init__(
        self,
        settings: SupervisorSettings,
        launcher: Launcher,
        *,
        table: RuleTable | None = None,
        listen_fd: int | None = None,
        dataplane: DataPlane,
        store: RuleStore | None = None,
        host_addresses: Callable[[], Collection[ipaddress.IPv4Address]] = host_addresses,
        is_loopback: Callable[[str], bool] = is_loopback_interface,
        interface_exists: Callable[[str], bool] = interface_exists,
    ) -> None:
        self.settings = settings
        self.store = store
        self.table = table or RuleTable()
        #: Saved or configured rules the access policy refuses: listed and kept, never installed.
        self.refused: dict[str, tuple[Rule, str]] = {}
        self._host_addresses = host_addresses
        self._is_loopback = is_loopback
        self._interface_exists = interface_exists
        self.dataplane: DataPlane = dataplane
        self.stats = StatsBook()
        #: Each data-worker process's counter page, read when the process is gone.
        self.counter_pages = CounterPages()
        self.log_level = trio_util.AsyncValue(settings.log_level)
        #: Serialises rule-table changes and the kernel plumbing that follows them.
        self.changes = trio.Lock()
        #: Actions the control role runs once the current reply has been sent.
        self.after_reply: list[Callable[[], Awaitable[None]]] = []
        #: Runs client requests for the supervisor's lifetime: a change outlives the control
        #: worker that forwarded it, so it is never cut off half-way when that worker dies.
        self.requests: trio.Nursery | None = None
        data_role = _DataRole(self)
        self.slots: dict[str, WorkerSlot] = {}
        if listen_fd is not None:
            self._add_slot(
                WorkerSpec("control", "control"), launcher, _ControlRole(self, listen_fd)
            )
        cpus = sorted(os.sched_getaffinity(0))
        for i in range(settings.num_workers):
            pinned = frozenset({cpus[i % len(cpus)]}) if settings.pin_workers else None
            self._add_slot(WorkerSpec("data", f"data-{i}", pinned), launcher, data_role)

    def _add_slot(self, spec: WorkerSpec, launcher: Launcher, role: Any) -> None:
        self.slots[spec.worker_id] = WorkerSlot(spec, launcher, self.settings, role, self.log_level)

    @property
    def data_slots(self) -> list[WorkerSlot]:
        return [s for s in self.slots.values() if s.spec.kind == "data"]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every worker slot until cancelled."""
        await self.dataplane.rules_changed(self.table, [])  # memberships for the initial rules
        async with trio.open_nursery() as nursery:
            self.requests = nursery
            for slot in self.slots.values():
                nursery.start_soon(slot.run, name=f"slot {slot.id}")
            nursery.start_soon(self.dataplane.follow_links, self)
            task_status.started()

    async def stop(self) -> None:
        """Stop every worker for good, in order: first the control worker (it answers the
        requests it holds; no new ones come), then the data workers together. Each gets Stop,
        then SIGKILL after the stop grace, and is reaped before this returns."""
        for slot in self.slots.values():
            if slot.spec.kind == "control":
                await slot.stop()
        async with trio.open_nursery() as nursery:
            for slot in self.data_slots:
                nursery.start_soon(slot.stop)

    async def wait_all_running(self) -> None:
        """Until every worker is running; data workers with the current rule set."""
        for slot in self.slots.values():
            await slot.state.wait_value(WorkerState.RUNNING)

    # --- rule changes ---------------------------------------------------------------------

    def load(self, rules: Iterable[Rule]) -> None:
        """Start from ``rules`` (saved or configured, so set by root earlier): what the policy
        refuses now is kept as ``refused`` (listed, saved, not installed), never dropped."""
        allowed, self.refused = self._split(rules)
        self.table.replace(allowed)
        for _, reason in self.refused.values():
            log.warning("%s; it stays listed as refused and is not installed", reason)
        try:
            self._check_cost()
        except RuleError as exc:  # root's own rules: kept, and what does not fit is degraded
            log.warning("%s", str(exc).replace(": nothing changed", ""))

    def _check_cost(self) -> None:
        """RuleError, in one sentence naming the limit, if the table costs more than it may."""
        cost = costs.price(
            self.table.rules,
            data_workers=len(self.data_slots),
            memberships_per_socket=max_memberships_per_socket(),
            interface_exists=self._interface_exists,
        )
        costs.check(cost, open_file_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    def saved_rules(self) -> tuple[Rule, ...]:
        """What the state file holds: the table and the refused rules, by id."""
        refused = (rule for rule, _ in self.refused.values())
        return tuple(sorted((*self.table.rules, *refused), key=lambda rule: rule.id))

    def _split(self, rules: Iterable[Rule]) -> tuple[list[Rule], dict[str, tuple[Rule, str]]]:
        rules = tuple(rules)
        RuleTable().replace(rules)  # the whole set, refused rules included, must be consistent
        return policy.check(
            self.settings.policy,
            rules,
            host_addresses=self._host_addresses,
            is_loopback=self._is_loopback,
        )

    def _admit(self, rules: Iterable[Rule]) -> None:
        """A change asked through the socket: refused whole, in one sentence, if any rule is."""
        _, refused = self._split(rules)
        for _, reason in refused.values():
            raise RuleError(reason)

    def _check_against_refused(self, rule: Rule) -> None:
        if rule.id in self.refused:
            raise RuleError(f"a rule with id {rule.id!r} already exists (refused)")
        for other, _ in self.refused.values():
            if other.match_key == rule.match_key:
                raise RuleError(
                    f"rule {other.id!r} (refused) already names {rule.input.group}:"
                    f"{rule.input.port} on {rule.input.interface}"
                )

    async def replace_rules(
        self, rules: tuple[Rule, ...], *, keep_refused: bool, start_by: float | None = None
    ) -> tuple[m.RuleUpdate, str | None]:
        """Make the rule set ``rules`` (see `_change`). From a client (``keep_refused`` false) a
        rule the policy refuses fails the whole change; from root's config file it is kept as
        refused."""
        # Checking a large set is pure work on immutable rules: done off the event loop, so
        # heartbeats and other clients are served meanwhile.
        if keep_refused:
            allowed, refused = await _off_loop(self._split, rules)
        else:
            await _off_loop(self._admit, rules)
            allowed, refused = list(rules), {}
        before = self.refused

        def change() -> m.RuleUpdate:
            self.refused = refused
            return self.table.replace(allowed)

        try:
            update, warning = await self._change(change, start_by)
        except BaseException:
            self.refused = before
            raise
        for _, reason in refused.values():
            log.warning("%s; it stays listed as refused and is not installed", reason)
        return update, warning

    async def reload_rules(
        self, choose: Callable[[tuple[Rule, ...]], tuple[tuple[Rule, ...], Seed]]
    ) -> tuple[m.RuleUpdate, str | None]:
        """Replace the table with what ``choose`` makes of it and of the refused rules (see
        `saved_rules`), decided under the rule-change lock, so no change made meanwhile is
        undone. The rules are root's config file: what the policy refuses is kept as refused,
        and the seed ``choose`` gives is saved with them."""
        store = self.store
        before, seed_before = self.refused, store.seed if store is not None else None

        def change() -> m.RuleUpdate:
            rules, seed = choose(self.saved_rules())
            allowed, self.refused = self._split(rules)
            if store is not None:
                store.seed = seed
            return self.table.replace(allowed)

        try:
            update, warning = await self._change(change)
        except BaseException:
            self.refused = before
            if store is not None:
                store.seed = seed_before
            raise
        for _, reason in self.refused.values():
            log.warning("%s; it stays listed as refused and is not installed", reason)
        return update, warning

    def preview_replace(self, rules: tuple[Rule, ...]) -> r.RulesReplaced:
        """What ReplaceRules would answer, after the same checks, changing nothing."""
        self._admit(rules)
        diff = RuleDiff.between(self.saved_rules(), rules)
        return r.RulesReplaced(
            added=sorted((*diff.added, *diff.changed)),
            removed=sorted((*diff.removed, *diff.changed)),
            dry_run=True,
        )

    @property
    def state_moved_aside(self) -> str | None:
        """Where an unreadable state file was moved at start (None: it was not)."""
        aside = self.store.moved_aside if self.store is not None else None
        return None if aside is None else str(aside)

    async def sync_worker(self, slot: WorkerSlot) -> None:
        """Give a starting data worker the whole table and wait for a matching acknowledgement."""
        while True:
            seq = self.table.seq
            await self.dataplane.provision(slot, self.table)
            await slot.send_during_provisioning(m.RuleSync(seq=seq, rules=self.table.rules))
            await slot.acked_seq.wait_value(lambda v, seq=seq: v >= seq)
            if self.table.seq == seq:
                return

    async def _change(
        self, change: Callable[[], m.RuleUpdate], start_by: float | None = None
    ) -> tuple[m.RuleUpdate, str | None]:
        """Make a table change, save it, then apply it everywhere; the update and a warning.

        A change that cannot be saved is undone, one that cannot begin by ``start_by`` is
        never made; both raise. One that was saved but whose directory could not be synced is
        made (a restart reads it back) and comes with a warning saying so.
        """
        with trio.move_on_at(start_by if start_by is not None else math.inf) as waiting:
            await self.changes.acquire()
        if waiting.cancelled_caught:
            raise McrelayError(
                f"the supervisor was busy with other rule changes for {CHANGE_START_LIMIT:g} s: "
                "nothing changed (try again)"
            )
        try:
            before = self.table.snapshot()
            update = change()
            try:
                self._check_cost()
            except RuleError:
                self.table.restore(before)
                raise
            warning = None
            if self.store is not None:
                try:
                    await trio.to_thread.run_sync(self.store.save, self.saved_rules())
                except StateNotDurable as exc:
                    warning = str(exc)
                    log.warning("rule change %d: %s", update.seq, warning)
                except McrelayError:
                    self.table.restore(before)
                    raise
            await self._apply(update)
            return update, warning
        finally:
            self.changes.release()

    async def _apply(self, update: m.RuleUpdate) -> None:
        """Push a committed change to running workers and wait (bounded) for their acks.

        Bounded by the send deadline plus the ack timeout: a worker that cannot take the update
        in time is killed as hung and resynced by its replacement.
        """
        slots = self.data_slots
        try:
            await self.dataplane.rules_changed(self.table, slots)
        except Exception:  # a plumbing bug must not take the daemon and its rules down
            log.exception("applying rule change %d to the kernel failed", update.seq)
        self.stats.prune(self.table.by_id)
        sent = await send_each(slots, update)
        with trio.move_on_after(self.settings.ack_timeout):
            for slot in sent:
                await slot.acked_seq.wait_value(lambda v: v >= update.seq)

    def _note_failures(self, slot: WorkerSlot, failed: dict[str, str]) -> None:
        """Keep what a worker could not install (only rules in the table: a worker's word is
        bounded by it), and say so once per rule and reason."""
        by_id = self.table.by_id
        now = {rule_id: reason for rule_id, reason in failed.items() if rule_id in by_id}
        for rule_id, reason in now.items():
            if slot.failed_rules.get(rule_id) != reason:
                log.error("worker %s cannot install rule %s: %s", slot.id, rule_id, reason)
        for rule_id in slot.failed_rules.keys() - now.keys():
            if rule_id in by_id:
                log.info("worker %s installed rule %s", slot.id, rule_id)
        slot.failed_rules = now

    def rule_state(self, rule: Rule) -> tuple[RuleState, str | None]:
        """A rule's state and, when ``failed``, why (which workers could not install it)."""
        reasons = [
            f"{slot.id}: {slot.failed_rules[rule.id]}"
            for slot in self.data_slots
            if rule.id in slot.failed_rules
        ]
        if reasons:
            return RuleState.FAILED, "; ".join(reasons)
        return self.dataplane.rule_state(rule), None

    async def on_ack(self, slot: WorkerSlot, ack: m.RuleAck) -> None:
        """Check a worker's acknowledgement against the table; resync it when it disagrees.

        A worker is trusted no further than its messages: one that still disagrees after
        ``MAX_RESYNCS`` full resyncs is broken (restarted, not resynced forever), and resyncs
        are at most one per ``RESYNC_INTERVAL``, however many wrong acks arrive.
        """
        expected = self.table.digest_at(ack.seq)
        if expected == ack.digest:
            slot.resyncs.count = 0
            slot.rule_count = ack.count
            slot.rule_digest = ack.digest
            self._note_failures(slot, ack.failed)
            if ack.seq > slot.acked_seq.value:
                slot.acked_seq.value = ack.seq
            return
        budget = slot.resyncs
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
            return m.RuleSync(seq=self.table.seq, rules=self.table.rules)

        # In the background: this runs in the worker's read loop, which must not wait.
        slot.post(resync, delay=delay)

    # --- control requests -----------------------------------------------------------------

    async def execute(self, request: m.ClientRequest, *, start_by: float | None = None) -> m.Reply:
        """Carry out one validated client request; errors become a reply, never an exception.

        A rule change not begun by ``start_by`` (trio time) is refused and never made.
        """
        try:
            result = await self._execute(request, start_by)
        except McrelayError as exc:
            return m.Reply(ok=False, error=str(exc))
        except Exception as exc:  # a bug handling one request must not take the daemon down
            log.exception("request %s failed", type(request).__name__)
            return m.Reply(ok=False, error=f"internal error: {type(exc).__name__}: {exc}")
        return m.Reply(ok=True, result=result)

    async def _execute(self, request: m.ClientRequest, start_by: float | None) -> r.Result:
        match request:
            case m.Ping():
                return r.Pong(protocol=m.PROTOCOL_VERSION)
            case m.ListWorkers():
                aside = self.state_moved_aside
                return r.Workers([s.describe(state_moved_aside=aside) for s in self.slots.values()])
            case m.ListRules():
                listed = [r.RuleInfo.of(rule, *self.rule_state(rule)) for rule in self.table.rules]
                listed += [
                    r.RuleInfo.of(rule, RuleState.REFUSED, reason)
                    for rule, reason in self.refused.values()
                ]
                return r.Rules(sorted(listed, key=lambda info: info.id))
            case m.AddRule(rule=rule):
                self._check_against_refused(rule)
                self._admit([rule])
                _, warning = await self._change(lambda: self.table.add(rule), start_by)
                log.info("rule %s added", rule.id)
                return r.Changed(rule.id, warning)
            case m.RemoveRule(id=rule_id) if rule_id in self.refused:
                refused = self.refused.pop(rule_id)
                try:
                    _, warning = await self._change(
                        lambda: self.table.replace(self.table.rules), start_by
                    )
                except BaseException:
                    self.refused[rule_id] = refused
                    raise
                log.info("refused rule %s removed", rule_id)
                return r.Changed(rule_id, warning)
            case m.RemoveRule(id=rule_id):
                _, warning = await self._change(lambda: self.table.remove(rule_id), start_by)
                log.info("rule %s removed", rule_id)
                return r.Changed(rule_id, warning)
            case m.ReplaceRules(rules=rules, dry_run=True):
                return self.preview_replace(rules)
            case m.ReplaceRules(rules=rules):
                update, warning = await self.replace_rules(
                    rules, keep_refused=False, start_by=start_by
                )
                log.info(
                    "rule set replaced: %d added or changed, %d removed or changed",
                    len(update.added),
                    len(update.removed),
                )
                added = [rule.id for rule in update.added]
                return r.RulesReplaced(added, list(update.removed), warning=warning)
            case m.GetStats():
                return self.stats.merged(self.table.rules, self.data_slots)
            case m.LogLevel(level=level):
                if level is not None:
                    await self.set_log_level(level)
                return r.LogLevelIs(self.log_level.value)
            case m.RestartWorker(id=worker_id):
                slot = self.slots.get(worker_id)
                if slot is None:
                    known = ", ".join(self.slots)
                    raise McrelayError(f"no worker {worker_id!r} (workers: {known})")
                if slot.spec.kind == "control":
                    # It carries this very reply: restart it once the reply is on its way.
                    self.after_reply.append(slot.restart_now)
                else:
                    await slot.restart_now()
                return r.Restarted(worker_id)
        raise McrelayError(f"unsupported request {type(request).__name__}")

    async def set_log_level(self, level: str) -> None:
        set_log_level(check_log_level(level))
        self.log_level.value = level
        await send_each(list(self.slots.values()), m.SetLogLevel(level=level))


#: Rule sets up to this size are checked on the event loop: ~0.3 s at most, well inside a
#: heartbeat timeout, and deterministic under the harness's fake clock (which jumps while a
#: thread runs). Larger ones (~0.8 s for 10,000 rules) are checked in a thread.
_OFF_LOOP_FROM = 4096


async def _off_loop(check: Callable[[tuple[Rule, ...]], T], rules: tuple[Rule, ...]) -> T:
    if len(rules) < _OFF_LOOP_FROM:
        return check(rules)
    return await trio.to_thread.run_sync(check, rules)


async def send_each(slots: list[WorkerSlot], message: object) -> list[WorkerSlot]:
    """Send to every live worker at once (a stuck one costs its deadline, not the others'
    turns); the slots that took it."""
    took: list[WorkerSlot] = []

    async def one(slot: WorkerSlot) -> None:
        if await slot.send(message):
            took.append(slot)

    async with trio.open_nursery() as nursery:
        for slot in slots:
            nursery.start_soon(one, slot)
    return took


class _DataRole:
    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor

    async def provision(self, slot: WorkerSlot) -> None:
        slot.rule_count = None
        slot.acked_seq.value = -1
        await self._send_counter_page(slot)
        await self._sup.sync_worker(slot)

    async def _send_counter_page(self, slot: WorkerSlot) -> None:
        """Before any rule: so every count the process makes is in its page."""
        pid = slot.pid
        fd = None if pid is None else self._sup.counter_pages.open(slot.id, pid)
        if fd is None:
            return
        try:
            await slot.send_during_provisioning(m.CounterPage(), [fd])
        finally:
            os.close(fd)

    def released(self, slot: WorkerSlot, pid: int) -> None:
        late_drops = self._sup.dataplane.worker_gone(slot, pid)
        sup = self._sup
        try:
            final = sup.counter_pages.take(slot.id, pid, sup.table.rules)
        except Exception:  # a bug reading one page must not take the daemon down
            log.exception("reading the counter page of %s (pid %d) failed", slot.id, pid)
            final = None
        lowered = sup.stats.retire(slot.id, pid, final, sup.table.by_id)
        sup.stats.retire_kernel_drops(late_drops)
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
            await self._sup.on_ack(slot, message)
        elif isinstance(message, m.StatsReport):
            self._sup.stats.record(slot.id, slot.pid, message, self._sup.table.by_id)
        else:
            log.warning("unexpected %s from %s", type(message).__name__, slot.id)


class _ControlRole:
    def __init__(self, supervisor: Supervisor, listen_fd: int) -> None:
        self._sup = supervisor
        self._listen_fd = listen_fd

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
