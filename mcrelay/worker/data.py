"""The data-plane worker: holds the rule set the supervisor gave it and relays packets.

Per capture socket (one per input interface, passed by the supervisor) it maps a TPACKET_V3 ring
and relays each retired block in one pass (``relay_loop``). A ring may come from a worker that
died: the supervisor keeps the socket, so this worker takes the ring over (`RxRing.take_over`) and
relays what waited in it, once it holds its first rule set. The socket's kernel filter and ring
are the supervisor's: the worker never sets an option on a capture socket (it only maps the ring
and reads its statistics), and its process forbids itself to at start (`mcrelay.system.seccomp`),
so code that takes the worker over cannot detach the filter either. Rules become per-interface
route tables keyed by destination address, port and VLAN id (0: untagged); output sockets are
opened when a rule is installed, never per packet. Counters live in cells of the counter page
the supervisor passed (`mcrelay.ipc.counter_page`), so the supervisor reads them even after a
SIGKILL; they are also pushed to it once a second, for rates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import trio

from mcrelay import rules as rules_mod
from mcrelay.dataplane.egress import Destination, SendBatch, open_output_socket, udp_gso_max
from mcrelay.dataplane.parse import NO_RULE, SOURCE_FILTERED, VID_MASK, Drop, inline_vlan, parse_udp
from mcrelay.dataplane.relay_loop import (
    BlockCounts,
    Output,
    Route,
    key_from_bytes,
    relay_forever,
    route_key,
)
from mcrelay.dataplane.ring import RxRing
from mcrelay.ipc import messages as m
from mcrelay.ipc.counter_page import Cells, drop_tag, output_tag, rule_tag
from mcrelay.ipc.framing import FrameChannel
from mcrelay.rules import Rule

log = logging.getLogger("mcrelay.data")

#: How often counters are pushed to the supervisor, and dead outputs are retried.
STATS_INTERVAL = 1.0
_GONE = frozenset({errno.ENODEV, errno.ENXIO, errno.ENETDOWN})


@dataclasses.dataclass
class _Capture:
    interface: str
    ring: RxRing
    sock: socket.socket
    scope: trio.CancelScope
    table: dict[int, Route] = dataclasses.field(default_factory=dict)
    relaying: bool = False  # its relay task was started (it closes the ring when it ends)


def _dead_socket() -> socket.socket:
    """Stands in for an output whose interface is missing: every send fails (EPIPE) and is
    counted as an egress error, and nothing ever leaves the host through it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    return sock


class _OutputSockets:
    """One socket per (interface, ttl, multicast), shared by every output that matches it.

    Outputs whose interface is missing (or whose socket cannot be opened, e.g. EMFILE) all
    share one dead socket opened at start, so they cost no descriptor each, and a failure to
    open a socket never needs another socket to handle it.
    """

    def __init__(self) -> None:
        self._socks: dict[tuple[str, int, bool], tuple[socket.socket, int]] = {}
        self.dead: set[tuple[str, int, bool]] = set()
        self._dead_sock = _dead_socket()

    def get(self, interface: str, ttl: int, multicast: bool) -> tuple[socket.socket, int]:
        """The socket and its UDP GSO segment limit (0: one datagram per message).

        A key found dead stays dead until `reopen` tries it again: a rebuild of many outputs
        on a missing interface costs one failed open, not one per output."""
        key = (interface, ttl, multicast)
        entry = self._socks.get(key)
        if entry is not None:
            return entry
        if key in self.dead:
            return (self._dead_sock, 0)
        return self._open(key)

    def reopen(self, keys: set[tuple[str, int, bool]]) -> set[tuple[str, int, bool]]:
        """Open these keys afresh (closing the live ones); the keys whose socket changed."""
        changed = set()
        for key in keys:
            entry = self._socks.pop(key, None)
            if entry is not None:
                entry[0].close()
            was_dead = key in self.dead
            self._open(key)
            if not (was_dead and key in self.dead):
                changed.add(key)
        return changed

    def _open(self, key: tuple[str, int, bool]) -> tuple[socket.socket, int]:
        interface, ttl, multicast = key
        try:
            sock = open_output_socket(interface, ttl=ttl, multicast=multicast)
        except OSError as exc:
            if key not in self.dead:
                log.warning("output interface %s unusable: %s", interface, exc.strerror or exc)
            self.dead.add(key)
            return (self._dead_sock, 0)
        try:
            entry = (sock, udp_gso_max(interface))
        except OSError:
            entry = (sock, 0)
        if key in self.dead:
            log.info("output interface %s is usable again", interface)
            self.dead.discard(key)
        self._socks[key] = entry
        return entry

    @property
    def dead_fd(self) -> int:
        return self._dead_sock.fileno()

    @property
    def open_count(self) -> int:
        """Descriptors held: one per usable (interface, ttl, multicast), plus the dead one."""
        return len(self._socks) + 1

    def forget(self, keys: set[tuple[str, int, bool]]) -> None:
        for key in keys:
            entry = self._socks.pop(key, None)
            if entry is not None:
                entry[0].close()

    def close(self) -> None:
        self.forget(set(self._socks))
        self._dead_sock.close()


def _output_key(out: rules_mod.Output) -> tuple[str, int, bool]:
    """(interface, ttl, multicast): the output's socket. The group is a validated dotted
    quad, so its first octet alone says multicast (224-239)."""
    group = out.group
    return (out.interface, out.ttl, 224 <= int(group[: group.index(".")]) <= 239)


def _rule_key(rule: Rule) -> int:
    """The route table key of a rule's input: `route_key`, with the VLAN id (0: untagged)
    above the 48 bits of address and port, so untagged frames keep the fast path's key."""
    return route_key(rule.input.group, rule.input.port) | (rule.input.vlan or 0) << 48


def _address(text: str) -> int:
    """A validated dotted quad as an integer (inet_pton: ipaddress is ~20x slower, and a
    10,000-rule table holds 100,000 addresses)."""
    return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")


class DataWorker:
    def __init__(
        self, channel: FrameChannel, worker_id: str, faults: frozenset[str] = frozenset()
    ) -> None:
        self._channel = channel
        #: Injected misbehaviour (`mcrelay.worker.faults`): what a broken or taken-over worker
        #: could say, to show the supervisor restarts it and stays up.
        self._faults = faults
        self.worker_id = worker_id
        self.rules: dict[str, Rule] = {}
        self._routes: dict[str, tuple[Rule, Route]] = {}
        #: Rules held but not installed (rule id → why); retried at every rule change.
        self.failed: dict[str, str] = {}
        #: Each rule's input count at the last report: only rules that moved are reported.
        self._reported: dict[str, int] = {}
        self._captures: dict[str, _Capture] = {}
        self._sockets = _OutputSockets()
        #: Every counter, in the supervisor's counter page once it has arrived.
        self._cells = Cells()
        #: Tags of the cells each rule holds, and the rule they were made for.
        self._tagged: dict[str, tuple[Rule, frozenset[int]]] = {}
        self._drops: dict[str, memoryview] = {}
        self._kernel_drops = 0
        self._batch = SendBatch()
        self._nursery: trio.Nursery | None = None
        #: Set once the first rule set is installed: a ring taken over from a dead worker holds
        #: frames for those rules, and relaying them with no route would drop them.
        self._has_rules = False

    async def run(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._report_stats)

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
            case m.AttachCapture(interface=interface, ring=spec):
                (fd,) = self._channel.take_fds(1)
                self._attach(interface, socket.socket(fileno=fd), spec)
            case m.DetachCapture(interface=interface):
                self._detach(interface)
            case m.CounterPage():
                (fd,) = self._channel.take_fds(1)
                self._attach_page(fd)
            case _:
                log.warning("unexpected %s from the supervisor", type(message).__name__)

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        for interface in list(self._captures):
            self._detach(interface)
        self._sockets.close()

    # --- rules ----------------------------------------------------------------------------

    async def _rules_changed(self, seq: int) -> None:
        self._rebuild_routes()
        if not self._has_rules:
            self._has_rules = True
            for capture in self._captures.values():
                self._start_relay(capture)
        digest = rules_mod.digest(self.rules.values())
        if "bad-digest" in self._faults:
            digest = "0" * len(digest)
        await self._channel.send(
            m.RuleAck(seq=seq, count=len(self.rules), digest=digest, failed=self.failed)
        )

    def _rebuild_routes(self) -> None:
        with _collector_paused():
            self._rebuild_routes_now()

    def _rebuild_routes_now(self) -> None:
        self._release_cells()
        old = self._routes
        self._routes = {}
        failed: dict[str, str] = {}
        for rule in self.rules.values():
            kept = old.pop(rule.id, None)
            if kept is not None and kept[0] == rule:
                self._routes[rule.id] = kept
            else:
                route = self._try_route(rule, failed)
                if route is not None:
                    self._routes[rule.id] = (rule, route)
        self.failed = failed
        in_use = {_output_key(o) for rule, _ in self._routes.values() for o in rule.outputs}
        unused = {k for rule, _ in old.values() for o in rule.outputs if (k := _output_key(o))}
        self._sockets.forget(unused - in_use)
        self._sockets.dead &= in_use
        for capture in self._captures.values():
            self._install(capture)

    def _try_route(self, rule: Rule, failed: dict[str, str]) -> Route | None:
        """The rule's route, or None with the reason in ``failed``: a rule this worker cannot
        install is reported as failed, and every other rule keeps relaying."""
        try:
            if "install-fail" in self._faults and rule.id.startswith("fail"):
                raise RuntimeError("injected installation failure")
            _rule_key(rule)  # what _install will need
            return self._make_route(rule)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[: m.MAX_REASON_LENGTH]
            if self.failed.get(rule.id) != reason:
                log.error("rule %s cannot be installed: %s", rule.id, reason)
            failed[rule.id] = reason
            return None

    def _make_route(self, rule: Rule) -> Route:
        """A route counting in the rule's cells: a rule id and output keep their counts across
        edits of the rule, as long as this worker holds them."""
        cell = self._cells.cell
        in_tag = rule_tag(rule.id)
        out_tags = [output_tag(rule.id, str(o)) for o in rule.outputs]
        self._tagged[rule.id] = (rule, frozenset((in_tag, *out_tags)))  # before any is taken
        outputs = []
        for o, tag in zip(rule.outputs, out_tags, strict=True):
            sock, gso_max = self._sockets.get(*_output_key(o))
            outputs.append(Output(sock, Destination(o.group, o.port), gso_max, counts=cell(tag)))
        source = rule.input.source
        return Route(
            outputs=tuple(outputs),
            source=_address(source) if source else None,
            counts=cell(in_tag),
        )

    def _release_cells(self) -> None:
        """Free the cells of rules no longer held and of outputs a changed rule no longer has,
        before any new one is taken: the page holds the largest table, not two of them."""
        for rule_id, (rule, tags) in list(self._tagged.items()):
            now = self.rules.get(rule_id)
            if now == rule:
                continue
            keep: set[int] = set()
            if now is None:
                del self._tagged[rule_id]
            else:
                keep = {rule_tag(rule_id), *(output_tag(rule_id, str(o)) for o in now.outputs)}
            for tag in tags - keep:
                self._cells.release(tag)

    def _attach_page(self, fd: int) -> None:
        """Keep every counter in the supervisor's page from now on (counts so far included)."""
        if self._cells.in_page:
            os.close(fd)
            log.warning("a second counter page from the supervisor: ignored")
            return
        try:
            self._cells.attach(fd)
        except (OSError, ValueError) as exc:
            log.error("cannot map the counter page: %s (counters are kept privately)", exc)
            return
        self._drops = {label: self._cells.cell(drop_tag(label)) for label in self._drops}
        self._routes = {}  # every route again, counting in the page
        self._rebuild_routes()

    def _install(self, capture: _Capture) -> None:
        """Point the capture's route table at the current rules (the supervisor keeps the
        socket's kernel filter in step with the same rules)."""
        by_key: dict[int, list[Route]] = {}
        for rule, route in self._routes.values():
            if rule.input.interface != capture.interface:
                continue
            key = _rule_key(rule)
            by_key.setdefault(key, []).append(route)
        capture.table = {key: Route.switch(routes) for key, routes in by_key.items()}

    # --- captures -------------------------------------------------------------------------

    def _attach(self, interface: str, sock: socket.socket, spec: m.CaptureSpec) -> None:
        self._detach(interface)
        sock.setblocking(False)  # fcntl O_NONBLOCK (already set by the supervisor), no option
        try:
            ring = RxRing(sock, spec)  # the supervisor installed it before bind
        except OSError as exc:
            log.error("cannot map a receive ring on %s: %s", interface, exc)
            sock.close()
            return
        capture = _Capture(interface, ring, sock, trio.CancelScope())
        self._install(capture)
        self._captures[interface] = capture
        found = ring.take_over()
        if found.blocks or found.sent_blocks:
            log.info(
                "capturing on %s: took over a ring holding %d frames in %d blocks%s",
                interface,
                found.frames,
                found.blocks,
                f", {found.half_sent_frames} of them in a block its previous reader had half "
                "sent (relayed again)"
                if found.half_sent_frames
                else "",
            )
        else:
            log.info("capturing on %s", interface)
        if self._has_rules:
            self._start_relay(capture)

    def _start_relay(self, capture: _Capture) -> None:
        assert self._nursery is not None
        capture.relaying = True
        self._nursery.start_soon(self._relay, capture)

    def _detach(self, interface: str) -> None:
        capture = self._captures.pop(interface, None)
        if capture is None:
            return
        if capture.relaying:
            capture.scope.cancel()  # its task closes the ring
        else:
            capture.ring.close()

    async def _relay(self, capture: _Capture) -> None:
        def counted(counts: BlockCounts) -> None:
            if counts.unmatched:
                self._count_drop(NO_RULE, counts.unmatched)
            if counts.filtered:
                self._count_drop(SOURCE_FILTERED, counts.filtered)

        try:
            with capture.scope:
                await relay_forever(capture.ring, capture, self._batch, self._slow, counted)
        except OSError as exc:
            log.error("capture on %s failed: %s", capture.interface, exc)
        finally:
            self._kernel_drops += capture.ring.stats().drops
            self._cells.set_kernel_drops(self._kernel_drops)
            capture.ring.close()
            if self._captures.get(capture.interface) is capture:
                del self._captures[capture.interface]

    def _slow(self, frame: bytes, vlan: int | None) -> tuple[int, int, int, int] | None:
        """Frames the fast path declines: parse fully, count what cannot be relayed.

        A tagged frame's key carries its VLAN id (`_rule_key`), so it matches only rules that
        name that VLAN; a second tag is refused by the parser at once."""
        parsed = parse_udp(frame, tagged=vlan is not None)
        if isinstance(parsed, Drop):
            self._count_drop(parsed.label, 1)
            return None
        key, src, start, end = parsed
        vid = vlan & VID_MASK if vlan is not None else inline_vlan(frame)
        return key_from_bytes(key) | vid << 48, start, end - start, int.from_bytes(src, "big")

    # --- statistics -----------------------------------------------------------------------

    def _count_drop(self, reason: str, count: int) -> None:
        cell = self._drops.get(reason)
        if cell is None:
            cell = self._drops[reason] = self._cells.cell(drop_tag(reason))
        cell[1] += count

    def _counters(self, rule: Rule, route: Route) -> m.RuleCounters:
        return m.RuleCounters(
            packets_in=route.packets,
            bytes_in=route.bytes,
            outputs={
                str(o): m.OutputCounters(out.packets, out.bytes, out.errors)
                for o, out in zip(rule.outputs, route.outputs, strict=True)
            },
        )

    def report(self) -> m.StatsReport:
        """Cumulative counts since this worker started, of the rules whose counts changed since
        the previous report; a rule's and an output's survive edits of the rule (they are per
        rule id and output), not its removal. An output counts only when its rule's input does,
        so the input count tells whether anything changed."""
        reported = self._reported
        rules = {}
        for rule_id, (rule, route) in self._routes.items():
            packets = route.packets
            if packets != reported.get(rule_id, 0):
                rules[rule_id] = self._counters(rule, route)
                reported[rule_id] = packets
        if len(reported) > len(self._routes):
            self._reported = {k: v for k, v in reported.items() if k in self._routes}
        kernel = self._kernel_drops + sum(c.ring.stats().drops for c in self._captures.values())
        self._cells.set_kernel_drops(kernel)
        if "stats-overflow" in self._faults:
            kernel = 2**64 - 1
        drops = {label: int(cell[1]) for label, cell in self._drops.items()}
        return m.StatsReport(rules=rules, drops=drops, kernel_drops=kernel)

    async def _report_stats(self) -> None:
        while True:
            await trio.sleep(STATS_INTERVAL)
            self._revive_outputs()
            fds = [self._sockets.dead_fd] if "send-fd" in self._faults else None
            await self._channel.send(self.report(), fds)
            if "page-garbage" in self._faults:
                self._scribble_on_page()

    def _scribble_on_page(self) -> None:
        """What a compromised worker could leave for the supervisor to read after its death."""
        for tag in list(self._cells.held()):
            cell = self._cells.cell(tag)
            cell[1] = cell[2] = cell[3] = 2**64 - 1
        log.error("fault injected: page-garbage")

    def _revive_outputs(self) -> None:
        """Reopen outputs whose interface was missing or has gone away and come back.

        Only routes whose socket changes are rebuilt: a large table on an interface that is
        still missing costs one failed open per interval, not a rebuild of every output
        (which would hold the relay up for as long as the rebuild takes)."""
        stale = set(self._sockets.dead)
        for rule, route in self._routes.values():
            for o, out in zip(rule.outputs, route.outputs, strict=True):
                if out.last_error in _GONE:
                    stale.add(_output_key(o))
                    out.last_error = 0
        if not stale:
            return
        changed = self._sockets.reopen(stale)
        if not changed:
            return
        for rule, route in list(self._routes.values()):
            if any(_output_key(o) in changed for o in rule.outputs):
                outputs = []
                for o, out in zip(rule.outputs, route.outputs, strict=True):
                    sock, gso_max = self._sockets.get(*_output_key(o))
                    outputs.append(dataclasses.replace(out, sock=sock, gso_max=gso_max))
                route.outputs = tuple(outputs)
        for capture in self._captures.values():
            self._install(capture)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Rebuilding a large table creates ~10 objects per output; the cyclic collector would
    rescan the whole heap many times over (most of a 10,000-rule install), and nothing built
    here is a cycle, so it is paused for the rebuild."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
