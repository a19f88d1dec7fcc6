"""The supervisor's core: worker slots, the rule table, and making a rule change everywhere.

It knows nothing about signals, sockets on disk or real processes: the launcher and the capture
plumbing are injected, so the test harness can drive it with fake workers under a fake clock.
The core tells the plumbing facts (the rules are now these, a worker is starting, one is gone)
and the plumbing never calls back. What each client request does is `requests`; the two worker
roles are `data_sync` (data workers and what they hold) and `control_role`.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import resource
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Protocol, TypeVar

import trio
import trio_util

from mcrelay import policy
from mcrelay.errors import McrelayError, RuleError
from mcrelay.ipc import messages as m
from mcrelay.ipc import replies as r
from mcrelay.ipc.vocabulary import RuleState
from mcrelay.rule_diff import RuleDiff
from mcrelay.rules import Rule
from mcrelay.supervisor import costs, requests
from mcrelay.supervisor.control_role import CHANGE_START_LIMIT, ControlRole
from mcrelay.supervisor.counter_pages import CounterPages
from mcrelay.supervisor.data_sync import DataRole
from mcrelay.supervisor.launcher import Launcher, WorkerSpec
from mcrelay.supervisor.memberships import max_memberships_per_socket
from mcrelay.supervisor.persistence import RuleStore, StateNotDurable
from mcrelay.supervisor.precedence import Seed
from mcrelay.supervisor.rule_table import RuleTable
from mcrelay.supervisor.settings import SupervisorSettings
from mcrelay.supervisor.slot import SlotRole, WorkerSlot
from mcrelay.supervisor.states import WorkerState
from mcrelay.supervisor.stats import StatsBook
from mcrelay.system.addresses import host_addresses, is_loopback_interface
from mcrelay.system.logs import check_log_level, set_log_level
from mcrelay.system.netlink import interface_exists

log = logging.getLogger("mcrelay.supervisor")
T = TypeVar("T")


class CapturePlumbing(Protocol):
    """Kernel-side plumbing for data workers (capture sockets, filters, group memberships).

    Told facts by the core, in one direction; it keeps what it needs (its copy of the rules,
    the workers it was told about, its own lock) and never reads the supervisor.
    """

    async def rules_changed(self, rules: tuple[Rule, ...]) -> None:
        """The table is now ``rules``: join/leave groups, refresh filters, open/close sockets."""
        ...

    async def worker_starting(self, worker: WorkerSlot, rules: tuple[Rule, ...]) -> None:
        """Send a starting data worker the capture sockets ``rules`` need that it lacks."""
        ...

    def worker_gone(self, worker_id: str, pid: int) -> None:
        """Worker process ``pid`` has been reaped (what its slot holds waits for the next)."""
        ...

    def worker_delayed(self, worker_id: str, delay: float) -> int:
        """The slot's next worker starts in ``delay`` s: let go of what would not wait that
        long; how many frames its rings dropped since a worker last read their counters."""
        ...

    def rule_state(self, rule: Rule) -> RuleState:
        """active, paused (input interface down) or unresolved (no such interface)."""
        ...

    async def run(self) -> None:
        """For the daemon's lifetime: follow interfaces that come and go, retry shortages."""
        ...

    def close(self) -> None: ...


class Supervisor:
    def __init__(
        self,
        settings: SupervisorSettings,
        launcher: Launcher,
        *,
        table: RuleTable | None = None,
        listen_fd: int | None = None,
        captures: CapturePlumbing,
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
        self.captures: CapturePlumbing = captures
        self.stats = StatsBook()
        #: Each data-worker process's counter page, read when the process is gone.
        self.counter_pages = CounterPages()
        self.log_level = trio_util.AsyncValue(settings.log_level)
        #: Serialises rule-table changes, each until every worker and the plumbing follow it.
        self.changes = trio.Lock()
        #: Actions the control role runs once the current reply has been sent.
        self.after_reply: list[Callable[[], Awaitable[None]]] = []
        #: Runs client requests for the supervisor's lifetime: a change outlives the control
        #: worker that forwarded it, so it is never cut off half-way when that worker dies.
        self.requests: trio.Nursery | None = None
        cpus = sorted(os.sched_getaffinity(0))
        data_specs = [
            WorkerSpec(
                "data",
                f"data-{i}",
                frozenset({cpus[i % len(cpus)]}) if settings.pin_workers else None,
            )
            for i in range(settings.num_workers)
        ]
        #: The data workers' role, which keeps what each of them holds of the table.
        self.data = DataRole(
            (spec.worker_id for spec in data_specs),
            self.table,
            captures,
            self.stats,
            self.counter_pages,
        )
        self.slots: dict[str, WorkerSlot] = {}
        if listen_fd is not None:
            self._add_slot(WorkerSpec("control", "control"), launcher, ControlRole(self, listen_fd))
        for spec in data_specs:
            self._add_slot(spec, launcher, self.data)

    def _add_slot(self, spec: WorkerSpec, launcher: Launcher, role: SlotRole) -> None:
        self.slots[spec.worker_id] = WorkerSlot(spec, launcher, self.settings, role, self.log_level)

    @property
    def data_slots(self) -> list[WorkerSlot]:
        return [s for s in self.slots.values() if s.spec.kind == "data"]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every worker slot until cancelled."""
        await self.captures.rules_changed(self.table.rules)  # memberships for the initial rules
        async with trio.open_nursery() as nursery:
            self.requests = nursery
            for slot in self.slots.values():
                nursery.start_soon(slot.run, name=f"slot {slot.id}")
            nursery.start_soon(self.captures.run)
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

    def admit(self, rules: Iterable[Rule]) -> None:
        """A change asked through the socket: refused whole, in one sentence, if any rule is."""
        _, refused = self._split(rules)
        for _, reason in refused.values():
            raise RuleError(reason)

    def check_against_refused(self, rule: Rule) -> None:
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
        """Make the rule set ``rules`` (see `change_table`). From a client (``keep_refused``
        false) a rule the policy refuses fails the whole change; from root's config file it is
        kept as refused."""
        # Checking a large set is pure work on immutable rules: done off the event loop, so
        # heartbeats and other clients are served meanwhile.
        if keep_refused:
            allowed, refused = await _off_loop(self._split, rules)
        else:
            await _off_loop(self.admit, rules)
            allowed, refused = list(rules), {}
        before = self.refused

        def change() -> m.RuleUpdate:
            self.refused = refused
            return self.table.replace(allowed)

        try:
            update, warning = await self.change_table(change, start_by)
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
            update, warning = await self.change_table(change)
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
        self.admit(rules)
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

    async def change_table(
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
        try:
            await self.captures.rules_changed(self.table.rules)
        except Exception:  # a plumbing bug must not take the daemon and its rules down
            log.exception("applying rule change %d to the kernel failed", update.seq)
        self.stats.prune(self.table.by_id)
        sent = await send_each(self.data_slots, update)
        with trio.move_on_after(self.settings.ack_timeout):
            await self.data.wait_acked(sent, update.seq)

    def rule_state(self, rule: Rule) -> tuple[RuleState, str | None]:
        """A rule's state and, when ``failed``, why (which workers could not install it)."""
        reasons = self.data.failures(rule)
        if reasons:
            return RuleState.FAILED, "; ".join(reasons)
        return self.captures.rule_state(rule), None

    # --- control requests -----------------------------------------------------------------

    async def execute(self, request: m.ClientRequest, *, start_by: float | None = None) -> m.Reply:
        """Carry out one validated client request; errors become a reply, never an exception.

        A rule change not begun by ``start_by`` (trio time) is refused and never made.
        """
        try:
            result = await requests.carry_out(self, request, start_by)
        except McrelayError as exc:
            return m.Reply(ok=False, error=str(exc))
        except Exception as exc:  # a bug handling one request must not take the daemon down
            log.exception("request %s failed", type(request).__name__)
            return m.Reply(ok=False, error=f"internal error: {type(exc).__name__}: {exc}")
        return m.Reply(ok=True, result=result)

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
