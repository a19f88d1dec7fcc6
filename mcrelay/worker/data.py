"""The data-plane worker: holds the rule set the supervisor gave it and relays packets.

Per capture socket (one per input interface, passed by the supervisor) it maps a TPACKET_V3 ring
and relays each retired block in one pass (``relay_loop``). The socket's kernel filter and ring
are the supervisor's: the worker never sets an option on a capture socket (it only maps the ring
and reads its statistics), and its process forbids itself to at start (`mcrelay.system.seccomp`),
so code that takes the worker over cannot detach the filter either. Rules become per-interface
route tables keyed by destination address and port; output sockets are opened when a rule is
installed, never per packet. Counters live on the route objects and are pushed to the supervisor
once a second.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import gc
import logging
import socket
from collections.abc import Iterator
from typing import Any

import trio

from mcrelay import rules as rules_mod
from mcrelay.dataplane.egress import Destination, SendBatch, open_output_socket, udp_gso_max
from mcrelay.dataplane.parse import Drop, parse_udp
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
        """The socket and its UDP GSO segment limit (0: one datagram per message)."""
        key = (interface, ttl, multicast)
        entry = self._socks.get(key)
        if entry is not None:
            return entry
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
    return (out.interface, out.ttl, _address(out.group) >> 28 == 0xE)


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
        self._retired: dict[str, m.RuleCounters] = {}
        self._captures: dict[str, _Capture] = {}
        self._sockets = _OutputSockets()
        self._drops: collections.Counter[str] = collections.Counter()
        self._kernel_drops = 0
        self._batch = SendBatch()
        self._nursery: trio.Nursery | None = None

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
            case m.AttachCapture(interface=interface):
                (fd,) = self._channel.take_fds(1)
                self._attach(interface, socket.socket(fileno=fd))
            case m.DetachCapture(interface=interface):
                self._detach(interface)
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
        old = self._routes
        self._routes = {}
        failed: dict[str, str] = {}
        for rule in self.rules.values():
            kept = old.pop(rule.id, None)
            if kept is not None and kept[0] == rule:
                self._routes[rule.id] = kept
            else:
                if kept is not None:
                    self._retire(rule.id, kept[0], kept[1])
                route = self._try_route(rule, failed)
                if route is not None:
                    self._routes[rule.id] = (rule, route)
        self.failed = failed
        for rule_id, (rule, route) in old.items():
            self._retire(rule_id, rule, route)
        # Counts of rules no longer held are not reported: memory follows the table.
        self._retired = {k: v for k, v in self._retired.items() if k in self.rules}
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
            route_key(rule.input.group, rule.input.port)  # what _install will need
            return self._make_route(rule)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[: m.MAX_REASON_LENGTH]
            if self.failed.get(rule.id) != reason:
                log.error("rule %s cannot be installed: %s", rule.id, reason)
            failed[rule.id] = reason
            return None

    def _make_route(self, rule: Rule) -> Route:
        outputs = []
        for o in rule.outputs:
            sock, gso_max = self._sockets.get(*_output_key(o))
            outputs.append(Output(sock, Destination(o.group, o.port), gso_max))
        source = rule.input.source
        return Route(outputs=tuple(outputs), source=_address(source) if source else None)

    def _install(self, capture: _Capture) -> None:
        """Point the capture's route table at the current rules (the supervisor keeps the
        socket's kernel filter in step with the same rules)."""
        by_key: dict[int, list[Route]] = {}
        for rule, route in self._routes.values():
            if rule.input.interface != capture.interface:
                continue
            key = route_key(rule.input.group, rule.input.port)
            by_key.setdefault(key, []).append(route)
        capture.table = {key: Route.switch(routes) for key, routes in by_key.items()}

    def _retire(self, rule_id: str, rule: Rule, route: Route) -> None:
        """Keep a replaced route's counts, so this worker's totals never go backwards."""
        now = self._counters(rule, route)
        before = self._retired.get(rule_id)
        if before is not None:
            now = _add(before, now)
        self._retired[rule_id] = now

    # --- captures -------------------------------------------------------------------------

    def _attach(self, interface: str, sock: socket.socket) -> None:
        self._detach(interface)
        sock.setblocking(False)  # fcntl O_NONBLOCK (already set by the supervisor), no option
        try:
            ring = RxRing(sock, configured=True)  # the supervisor installed it before bind
        except OSError as exc:
            log.error("cannot map a receive ring on %s: %s", interface, exc)
            sock.close()
            return
        capture = _Capture(interface, ring, sock, trio.CancelScope())
        self._install(capture)
        self._captures[interface] = capture
        assert self._nursery is not None
        self._nursery.start_soon(self._relay, capture)
        log.info("capturing on %s", interface)

    def _detach(self, interface: str) -> None:
        capture = self._captures.pop(interface, None)
        if capture is not None:
            capture.scope.cancel()

    async def _relay(self, capture: _Capture) -> None:
        def counted(counts: BlockCounts) -> None:
            if counts.unmatched:
                self._drops["no_rule"] += counts.unmatched
            if counts.filtered:
                self._drops["source_filtered"] += counts.filtered

        try:
            with capture.scope:
                await relay_forever(capture.ring, capture, self._batch, self._slow, counted)
        except OSError as exc:
            log.error("capture on %s failed: %s", capture.interface, exc)
        finally:
            self._kernel_drops += capture.ring.stats().drops
            capture.ring.close()
            if self._captures.get(capture.interface) is capture:
                del self._captures[capture.interface]

    def _slow(self, frame: bytes, vlan: int | None) -> tuple[int, int, int, int] | None:
        """Frames the fast path declines: parse fully, count what cannot be relayed."""
        parsed = parse_udp(frame)
        if isinstance(parsed, Drop):
            self._drops[parsed.label] += 1
            return None
        key, src, start, end = parsed
        return key_from_bytes(key), start, end - start, int.from_bytes(src, "big")

    # --- statistics -----------------------------------------------------------------------

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
        rules: dict[str, m.RuleCounters] = dict(self._retired)
        for rule_id, (rule, route) in self._routes.items():
            live = self._counters(rule, route)
            rules[rule_id] = _add(rules[rule_id], live) if rule_id in rules else live
        kernel = self._kernel_drops + sum(c.ring.stats().drops for c in self._captures.values())
        if "stats-overflow" in self._faults:
            kernel = 2**64 - 1
        return m.StatsReport(rules=rules, drops=dict(self._drops), kernel_drops=kernel)

    async def _report_stats(self) -> None:
        while True:
            await trio.sleep(STATS_INTERVAL)
            self._revive_outputs()
            fds = [self._sockets.dead_fd] if "send-fd" in self._faults else None
            await self._channel.send(self.report(), fds)

    def _revive_outputs(self) -> None:
        """Reopen outputs whose interface was missing or has gone away and come back."""
        stale = set(self._sockets.dead)
        for rule, route in self._routes.values():
            for o, out in zip(rule.outputs, route.outputs, strict=True):
                if out.last_error in _GONE:
                    stale.add(_output_key(o))
                    out.last_error = 0
        if not stale:
            return
        self._sockets.forget(stale)
        changed = False
        for rule, route in list(self._routes.values()):
            if any(_output_key(o) in stale for o in rule.outputs):
                outputs = []
                for o, out in zip(rule.outputs, route.outputs, strict=True):
                    sock, gso_max = self._sockets.get(*_output_key(o))
                    outputs.append(dataclasses.replace(out, sock=sock, gso_max=gso_max))
                route.outputs = tuple(outputs)
                changed = True
        if changed:
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


def _add(a: m.RuleCounters, b: m.RuleCounters) -> m.RuleCounters:
    outputs = dict(a.outputs)
    for key, oc in b.outputs.items():
        prev = outputs.get(key)
        outputs[key] = (
            oc
            if prev is None
            else m.OutputCounters(
                prev.packets + oc.packets, prev.bytes + oc.bytes, prev.errors + oc.errors
            )
        )
    return m.RuleCounters(a.packets_in + b.packets_in, a.bytes_in + b.bytes_in, outputs)
