"""Kernel-side plumbing for data workers: capture sockets, their filters, group memberships.

The supervisor is the only privileged process, so it opens every AF_PACKET socket and passes it
to a data worker over the socketpair. It keeps its own copy, because the socket's BPF filter is
the supervisor's: it attaches it before bind and replaces it in place when the rules on that
interface change; the worker only maps the ring and never sets an option on the socket.

The sockets belong to the worker *slot*, not to one process. When a worker dies the supervisor
keeps them: frames go on landing in their rings (a fanout member keeps its share of the flows),
and the replacement is handed the same sockets and relays what waited (`RxRing.take_over`). Only
when the replacement is due later than a ring can cover (`CaptureSpec.low_rate_cover_s`: a
crash loop's longer backoff) are they closed, so the kernel moves their share to the other
workers instead of keeping stale frames for a worker that is not coming soon.

The core tells it facts (the rules are now these, this worker is starting, that one is gone,
it comes back in so long) and never is called back: it keeps its own copy of the rules, the
workers it was told about and its own lock, so an interface that comes or goes is followed
without asking the core anything.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import logging
import os
import socket

import trio

from mcrelay.dataplane import bpf, ring
from mcrelay.dataplane.capture import CAPTURE_RING, open_capture_socket
from mcrelay.ipc import messages as m
from mcrelay.ipc.messages import CaptureSpec
from mcrelay.ipc.vocabulary import RuleState
from mcrelay.rules import Rule
from mcrelay.supervisor.memberships import SHORTAGES, Memberships
from mcrelay.supervisor.slot import WorkerSlot
from mcrelay.system.netlink import Link, LinkMonitor, LinkState, link

log = logging.getLogger("mcrelay.supervisor")


def input_interfaces(rules: tuple[Rule, ...]) -> set[str]:
    return {r.input.interface for r in rules}


def filter_pairs(rules: tuple[Rule, ...], interface: str) -> list[tuple[str, int]]:
    """(destination, port) pairs a capture socket on ``interface`` must let through."""
    return [(r.input.group, r.input.port) for r in rules if r.input.interface == interface]


def filter_vlans(rules: tuple[Rule, ...], interface: str) -> set[int]:
    """VLAN ids whose tagged frames a capture socket on ``interface`` must let through."""
    return {
        r.input.vlan for r in rules if r.input.interface == interface and r.input.vlan is not None
    }


def wanted_memberships(rules: tuple[Rule, ...]) -> set[tuple[str, str]]:
    return {
        (r.input.interface, r.input.group)
        for r in rules
        if ipaddress.IPv4Address(r.input.group).is_multicast
    }


#: How often joins that failed for lack of descriptors or memory are tried again, seconds.
_SHORTAGE_RETRY = 1.0

_RULE_STATES = {
    LinkState.UP: RuleState.ACTIVE,
    LinkState.DOWN: RuleState.PAUSED,
    LinkState.ABSENT: RuleState.UNRESOLVED,
}


class KernelCaptures:
    """The capture sockets and memberships the supervisor holds for its data workers."""

    def __init__(self, ring_spec: CaptureSpec = CAPTURE_RING) -> None:
        #: The ring of every capture socket (``--capture-ring-mib``).
        self.ring_spec = ring_spec
        #: The rules the plumbing follows: the table as of the last `rules_changed`.
        self._rules: tuple[Rule, ...] = ()
        #: The data workers it was told are starting, by id, until they are gone.
        self._workers: dict[str, WorkerSlot] = {}
        #: Serialises rule changes, link changes and retries: each looks at the held sockets
        #: across sends to workers.
        self._lock = trio.Lock()
        #: Per input interface, the state and index the capture sockets and memberships follow.
        self._links: dict[str, Link] = {}
        self.memberships = Memberships()
        self._fanout: dict[str, int] = {}
        self._next_fanout = itertools.count((os.getpid() * 97) & 0xFFFF)
        #: Per worker slot: the capture socket of each interface it holds (the supervisor's
        #: copy, through which the filter is replaced), kept across the slot's processes.
        self._held: dict[str, dict[str, socket.socket]] = {}
        #: Per worker slot: the process its held sockets were last handed to.
        self._handed: dict[str, int | None] = {}
        #: The filter every capture socket on an interface carries, compiled once per change.
        self._programs: dict[str, list[bpf.Instruction]] = {}
        self._warned: set[str] = set()
        #: Set when a join or capture failed for lack of descriptors or memory.
        self._shortage = trio.Event()

    def _live(self) -> list[WorkerSlot]:
        """The workers past provisioning (a starting one gets its sockets from
        `worker_starting`)."""
        return [worker for worker in self._workers.values() if worker.channel_ready]

    async def worker_starting(self, worker: WorkerSlot, rules: tuple[Rule, ...]) -> None:
        """Send a starting data worker the capture sockets its slot holds (kept from its
        predecessor, frames waiting in their rings) and one for each other input interface of
        ``rules`` (it is told those rules next)."""
        async with self._lock:
            self._workers[worker.id] = worker
            held = self._held.setdefault(worker.id, {})
            if self._handed.get(worker.id) != worker.pid:
                self._handed[worker.id] = worker.pid
                for interface, sock in sorted(held.items()):
                    await self._hand_over(worker, interface, sock, provisioning=True)
            for interface in sorted(input_interfaces(rules) - set(held)):
                await self._attach(worker, interface, rules, provisioning=True)

    def worker_gone(self, worker_id: str, pid: int) -> None:
        """Worker process ``pid`` has been reaped. Its capture sockets are kept for its
        replacement, which reads their drop counters too."""
        if self._handed.get(worker_id) == pid:
            self._handed[worker_id] = None
        self._workers.pop(worker_id, None)

    def worker_delayed(self, worker_id: str, delay: float) -> int:
        """The slot's next worker starts in ``delay`` seconds. Longer than a ring covers: close
        its capture sockets, so the other workers take its share of the flows (the next one
        gets new sockets); the frames their rings dropped, which nobody will report."""
        if delay <= self.ring_spec.low_rate_cover_s:
            return 0
        return self._release(worker_id)

    def _release(self, worker_id: str) -> int:
        """Close the capture sockets of a worker slot; the frames their rings dropped since a
        worker last read the counters (which no worker will report)."""
        drops = 0
        self._handed.pop(worker_id, None)
        for sock in self._held.pop(worker_id, {}).values():
            with contextlib.suppress(OSError):
                drops += ring.read_statistics(sock)[1]
            sock.close()
        return drops

    def rule_state(self, rule: Rule) -> RuleState:
        """active (capturing), paused (interface down) or unresolved (no such interface).

        The state the plumbing has caught up with, not the link's: "active" means capture
        sockets and memberships for the interface are in place.
        """
        interface = rule.input.interface
        known = self._links.get(interface)
        return _RULE_STATES[(known if known is not None else link(interface)).state]

    async def run(self) -> None:
        """For the daemon's lifetime: re-create capture sockets and memberships when an input
        interface comes (back) up, also when it was deleted and created again between two
        looks (same name and state, new index: no event in between need have shown it absent
        or down); and retry what failed for lack of descriptors or memory."""
        spec = self.ring_spec
        log.info(
            "capture rings: %d MiB per input interface and data worker (%d blocks of %d KiB): "
            "up to %.1f s of traffic waits in them while a data worker is replaced",
            spec.mapped_size >> 20,
            spec.block_count,
            spec.block_size >> 10,
            spec.low_rate_cover_s,
        )
        monitor = LinkMonitor()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._retry_shortages)
                await self._follow(monitor)
        finally:
            monitor.close()

    async def _retry_shortages(self) -> None:
        """Joins and captures that failed for lack of descriptors or memory are tried again
        every second until they succeed (each shortage was logged once)."""
        while True:
            await self._shortage.wait()
            await trio.sleep(_SHORTAGE_RETRY)
            self._shortage = trio.Event()
            async with self._lock:
                rules = self._rules
                self._join(rules)
                for slot in self._live():
                    held = self._held.setdefault(slot.id, {})
                    for interface in sorted(input_interfaces(rules) - set(held)):
                        known = self._links.get(interface)
                        if known is not None and known.state is LinkState.UP:
                            await self._attach(slot, interface, rules, provisioning=False)

    def _join(self, rules: tuple[Rule, ...]) -> None:
        self.memberships.update(wanted_memberships(rules))
        if self.memberships.short:
            self._shortage.set()

    async def _follow(self, monitor: LinkMonitor) -> None:
        while True:
            events = await monitor.receive()
            async with self._lock:
                named = {name for name, _ in events}
                for interface in sorted(input_interfaces(self._rules)):
                    if events and interface not in named:
                        continue
                    now = link(interface)
                    before = self._links.get(interface)
                    if now != before:
                        await self._link_changed(interface, now, before)
                        self._links[interface] = now

    async def _link_changed(self, interface: str, now: Link, before: Link | None) -> None:
        rules = self._rules
        slots = self._live()
        state = now.state
        if state is LinkState.DOWN:
            log.warning("input interface %s is down: its rules are paused", interface)
            return
        back_up = before is not None and before.state is LinkState.DOWN and state is LinkState.UP
        if back_up and before is not None and before.ifindex == now.ifindex:
            # The same interface back up: the kernel hooks its capture sockets up again (and
            # keeps its group memberships), so they and what waits in their rings are kept;
            # only workers that hold none for it get one.
            log.info("input interface %s is up again: capturing", interface)
            await self._attach_missing(interface, slots, rules)
            return
        self.memberships.forget(interface)
        for worker_id in list(self._held):
            await self._detach(worker_id, interface)
        if state is LinkState.ABSENT:
            log.warning("input interface %s is gone: its rules are unresolved", interface)
            return
        if before is not None and before.state is LinkState.UP:
            log.warning(
                "input interface %s was re-created (index %d, was %d): capturing on the new one",
                interface, now.ifindex, before.ifindex,
            )  # fmt: skip
        else:
            log.info("input interface %s is up: capturing", interface)
        await self._attach_missing(interface, slots, rules)

    async def _attach_missing(
        self, interface: str, slots: list[WorkerSlot], rules: tuple[Rule, ...]
    ) -> None:
        """Join the groups of ``rules`` and give each of ``slots`` that holds no capture socket
        on ``interface`` one."""
        self._join(rules)
        for slot in slots:
            if interface not in self._held.get(slot.id, {}):
                await self._attach(slot, interface, rules, provisioning=False)

    async def rules_changed(self, rules: tuple[Rule, ...]) -> None:
        """The table is now ``rules``: join/leave groups, refresh filters in place, and open or
        close capture sockets of running workers."""
        async with self._lock:
            self._rules = rules
            interfaces = input_interfaces(rules)
            for interface in set(self._links) - interfaces:
                del self._links[interface]  # looked at afresh if a rule names it again
            for interface in interfaces - set(self._links):
                self._links[interface] = link(interface)
            self._join(rules)
            self._refresh_filters(rules)
            for worker_id, held in list(self._held.items()):
                for interface in sorted(set(held) - interfaces):
                    await self._detach(worker_id, interface)
            for slot in self._live():
                held = self._held.setdefault(slot.id, {})
                for interface in sorted(interfaces - set(held)):
                    await self._attach(slot, interface, rules, provisioning=False)
            for interface in set(self._fanout) - interfaces:
                del self._fanout[interface]

    def _program(self, interface: str, rules: tuple[Rule, ...]) -> list[bpf.Instruction]:
        program = self._programs.get(interface)
        if program is None:
            program = self._programs[interface] = bpf.compile_filter(
                filter_pairs(rules, interface), vlans=filter_vlans(rules, interface)
            )
        return program

    def _refresh_filters(self, rules: tuple[Rule, ...]) -> None:
        """Replace, in place and atomically, the filter of every capture socket whose
        interface's (destination, port) pairs changed; workers keep their rings."""
        old, self._programs = self._programs, {}
        for interface in input_interfaces(rules):
            program = self._program(interface, rules)
            if old.get(interface) == program:
                continue
            for held in self._held.values():
                sock = held.get(interface)
                if sock is None:
                    continue
                try:
                    bpf.attach(sock, program)
                except OSError as exc:
                    log.error("cannot update the capture filter on %s: %s", interface, exc)

    async def _detach(self, worker_id: str, interface: str) -> None:
        """Close the slot's capture socket on ``interface``; tell its worker if one runs."""
        sock = self._held.get(worker_id, {}).pop(interface, None)
        if sock is None:
            return
        sock.close()
        slot = self._workers.get(worker_id)
        if slot is not None and slot.channel_ready:
            await slot.send(m.DetachCapture(interface=interface))

    async def _attach(
        self, slot: WorkerSlot, interface: str, rules: tuple[Rule, ...], *, provisioning: bool
    ) -> None:
        """Open a capture socket for ``slot`` and hand it over; the supervisor keeps a copy."""
        try:
            sock = self._open(interface, rules)
        except OSError as exc:
            if interface not in self._warned:
                log.warning("cannot capture on %s: %s", interface, exc.strerror or exc)
                self._warned.add(interface)
            if exc.errno in SHORTAGES:
                self._shortage.set()  # retried by _retry_shortages
            return
        self._warned.discard(interface)
        self._held.setdefault(slot.id, {})[interface] = sock
        await self._hand_over(slot, interface, sock, provisioning=provisioning)

    async def _hand_over(
        self, slot: WorkerSlot, interface: str, sock: socket.socket, *, provisioning: bool
    ) -> None:
        """Send a held capture socket to ``slot``'s worker. If that worker is gone (or going)
        the socket stays held for its replacement."""
        message = m.AttachCapture(interface=interface, ring=self.ring_spec)
        if provisioning:
            await slot.send_during_provisioning(message, [sock.fileno()])
        else:
            await slot.send(message, [sock.fileno()])

    def _open(self, interface: str, rules: tuple[Rule, ...]) -> socket.socket:
        program = self._program(interface, rules)
        for _ in range(16):
            group = self._fanout.get(interface)
            if group is None:
                group = next(self._next_fanout) & 0xFFFF
            try:
                sock = open_capture_socket(
                    interface, self.ring_spec, fanout_group=group, program=program
                )
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EALREADY, errno.EADDRINUSE) and (
                    interface not in self._fanout
                ):
                    continue  # that fanout id is taken in this namespace: try the next one
                raise
            self._fanout[interface] = group
            return sock
        raise OSError(errno.EADDRINUSE, "no free fanout group id")

    def close(self) -> None:
        """Close every capture socket and leave every group (the daemon is ending)."""
        for worker_id in list(self._held):
            self._release(worker_id)
        self.memberships.close()
