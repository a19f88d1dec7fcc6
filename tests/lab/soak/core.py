"""The soak itself: its rule bookkeeping, health checks and checkpoints, and the run of
segments (traffic, one event, recovery, accounting) until the budget is spent."""

from __future__ import annotations

import random
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import msgspec

from mcrelay import config as config_mod
from mcrelay import rules as rules_mod
from mcrelay.errors import McrelayError
from mcrelay.ipc import messages as m
from tests.lab import topology
from tests.lab.processes import end_process, poll
from tests.lab.relay import gen
from tests.lab.soak import faults
from tests.lab.soak.booking import as_booked
from tests.lab.soak.events import Event
from tests.lab.soak.procs import Ident, alive, ident_of, send_signal, spawners_of, state_of, usage
from tests.lab.soak.relay import Relay
from tests.lab.soak.report import fmt, nonzero
from tests.lab.soak.settings import (
    CHECKPOINT_EVERY_S,
    ESTIMATE_S,
    EXTRA_RULES_MAX,
    IN_PORT,
    LOAD_DEADLINE_S,
    OUT_PORT,
    PRE_S,
    RECOVERY_TIMEOUT,
    SEGMENT_MAX_S,
    SEGMENT_OVERHEAD_S,
    SETTINGS_NOTE,
    SIZE,
    STREAMS,
    TAIL_S,
    WEIGHTS,
    Options,
)
from tests.lab.soak.traffic import counter, net_drops, sink_group, sink_report, sinks, stop_gen


class Soak:
    def __init__(self, opts: Options, chain: topology.Chain, relay: Relay) -> None:
        self.opts, self.c, self.relay = opts, chain, relay
        self.rng = random.Random(opts.seed)
        self.expected: dict[str, dict[str, Any]] = {}
        self.base_ids: list[str] = []
        self.next_extra = 0
        self.events: list[Event] = []
        self.problems: list[str] = []
        self.stopped: list[Ident] = []  # every process we SIGSTOPped, for the final check
        self.worker_wedges: list[str] = []  # events after which not all ran again in time
        self.rules_lost_seen = 0  # rules missing from a listing after an event
        self.loads = 0  # config loads made
        self.checkpoints: list[dict[str, Any]] = []  # fd/RSS per process, base table, no traffic
        self.rules_at_end = 0  # before the end checkpoint puts the base rules back
        self.t0 = time.monotonic()
        self.budget_end = 0.0
        self.supervisor_kills_allowed = 0
        # (supervisor instance, (kernel drops, output errors)) at the last reading
        self.relay_drops: tuple[int, tuple[int, int]] = (0, (0, 0))

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    # rules ------------------------------------------------------------------------------

    def add_rule(self, rid: str, group: str, port: int, outputs: list[tuple[str, int, int]]) -> str:
        args = [
            "add",
            "--input-interface",
            self.c.relay_in,
            "--input-group",
            group,
            "--input-port",
            str(port),
            "--id",
            rid,
        ]
        for addr, oport, ttl in outputs:
            args += ["--output", f"{addr}:{oport}:{self.c.relay_out}:{ttl}"]
        result = self.relay.cli(*args)
        if result.returncode != 0 or result.stdout.strip() != rid:
            return f"add {rid} failed ({result.returncode}): {result.stderr.strip()}"
        self.expected[rid] = {
            "input": {"interface": self.c.relay_in, "group": group, "port": port, "source": None},
            "outputs": [
                {"group": a, "port": p, "interface": self.c.relay_out, "ttl": t}
                for a, p, t in outputs
            ],
        }
        return ""

    def churn_once(self) -> dict[str, Any]:
        extras = sorted(set(self.expected) - set(self.base_ids))
        if not extras or (len(extras) < EXTRA_RULES_MAX and self.rng.random() < 0.55):
            n = self.next_extra
            self.next_extra += 1
            rid = f"soak-x{n}"
            outputs = [
                (f"239.4.{n // 200}.{n % 200 + 1}", 6001 + k, self.rng.choice((16, 32)))
                for k in range(self.rng.randint(1, 2))
            ]
            error = self.add_rule(rid, f"239.3.{n // 200}.{n % 200 + 1}", 6000, outputs)
            return {"op": "add", "id": rid, "error": error}
        rid = self.rng.choice(extras)
        result = self.relay.cli("remove", rid)
        error = "" if result.returncode == 0 else f"remove {rid}: {result.stderr.strip()}"
        if not error:
            del self.expected[rid]
        return {"op": "remove", "id": rid, "error": error}

    def rules_mismatch(self, listed: list[dict[str, Any]]) -> tuple[str, int]:
        """What differs from the bookkeeping, and how many of the soak's rules are missing."""
        got = {r["id"]: as_booked(r) for r in listed}
        missing = sorted(set(self.expected) - set(got))
        unexpected = sorted(set(got) - set(self.expected))
        differ = sorted(k for k in set(got) & set(self.expected) if got[k] != self.expected[k])
        inactive = sorted(r["id"] for r in listed if r["state"] != "active")
        parts = [
            f"{name}: {', '.join(ids)}"
            for name, ids in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("different", differ),
                ("not active", inactive),
            )
            if ids
        ]
        return "; ".join(parts), len(missing) + len(differ)

    # health -----------------------------------------------------------------------------

    def healthy(self, replaced: dict[str, int]) -> dict[str, dict[str, Any]] | None:
        """Every worker running and alive, data workers holding every rule, and each slot in
        ``replaced`` on another process than the given pid."""
        try:
            ws = self.relay.workers()
        except McrelayError:  # the control worker is being replaced: ask again
            return None
        for w in ws.values():
            if w["state"] != "running" or "ident" not in w or not alive(w["ident"]):
                return None
            if w["kind"] == "data" and w["rules"] != len(self.expected):
                return None
        if any(ws[wid]["pid"] == pid for wid, pid in replaced.items()):
            return None
        try:  # and every rule active (a link that came back up is captured again)
            if any(r["state"] != "active" for r in self.relay.rules()):
                return None
        except McrelayError:
            return None
        return ws

    def wait_healthy(self, ev: Event | None = None, replaced: dict[str, int] | None = None) -> bool:
        """Poll until healthy; a timeout is a problem of the event (or of the run)."""
        ws = poll(lambda: self.healthy(replaced or {}), RECOVERY_TIMEOUT, 0.1)
        if ws is None:
            problem = f"not recovered within {RECOVERY_TIMEOUT:.0f} s"
            (ev.problems if ev is not None else self.problems).append(problem)
            return False
        self.relay.current = ws
        return True

    def gone(self, ident: Ident, ev: Event, what: str, timeout: float = 5) -> None:
        """The process must be gone (reaped): a zombie or stopped leftover is a problem."""
        if poll(lambda: state_of(ident) is None, timeout) is None:
            state = state_of(ident)
            ev.problems.append(f"{what} (pid {ident[0]}) still present in state {state}")
            send_signal(ident, signal.SIGKILL)  # ours: never leave it behind

    def check_rules(self, ev: Event, when: str) -> None:
        """The supervisor lists exactly the soak's rules; a missing one is a rule lost."""
        mismatch, missing = self.rules_mismatch(self.relay.rules())
        if mismatch:
            ev.problems.append(f"rules {when} differ: {mismatch}")
            self.rules_lost_seen += missing

    def load(self, table: dict[str, dict[str, Any]]) -> str:
        """`mcrelay config load` of a file holding exactly ``table``; the bookkeeping follows."""
        rules = msgspec.convert(
            [{"id": rid, **spec} for rid, spec in sorted(table.items())],
            tuple[rules_mod.Rule, ...],
        )
        path = self.relay.state_dir.parent / "load.toml"
        path.write_text(config_mod.dump(rules), encoding="utf-8")
        result = self.relay.cli("config", "load", str(path), deadline=LOAD_DEADLINE_S)
        if result.returncode != 0:
            return f"config load of {len(table)} rules failed: {result.stderr.strip()}"
        self.expected = dict(table)
        self.loads += 1
        return ""

    def checkpoint(self, label: str) -> None:
        """Descriptors and RSS of the supervisor, its spawner and every worker in one fixed
        state: no traffic, the base rules only (a config load puts the table back), everything
        running; the median of 5 readings 0.2 s apart, 1 s after the relay settled."""
        error = self.load({rid: self.expected[rid] for rid in self.base_ids})
        if error or not self.wait_healthy():
            self.problems.append(f"checkpoint {label}: {error or 'the relay did not settle'}")
            return
        time.sleep(1.0)  # the last acknowledgements and membership changes settle
        procs: dict[str, Ident | None] = {"supervisor": ident_of(self.relay.pid)}
        for found in spawners_of(self.relay.pid):
            procs["spawner"] = found
        for wid, w in sorted(self.relay.current.items()):
            procs[wid] = w["ident"]
        readings: dict[str, list[tuple[int, int]]] = {name: [] for name in procs}
        for _ in range(5):
            for name, ident in procs.items():
                if ident is not None and (u := usage(ident)) is not None:
                    readings[name].append(u)
            time.sleep(0.2)
        point: dict[str, Any] = {
            "label": label,
            "at_s": round(time.monotonic() - self.t0, 1),
            "rules": len(self.expected),
            "processes": {
                name: {
                    "pid": procs[name][0],  # type: ignore[index]
                    "fds": int(statistics.median(r[0] for r in rs)),
                    "rss_kib": int(statistics.median(r[1] for r in rs)),
                }
                for name, rs in readings.items()
                if rs
            },
        }
        self.checkpoints.append(point)
        self.log(
            f"checkpoint {label}: "
            + ", ".join(
                f"{n} {p['fds']} fds {p['rss_kib']} KiB" for n, p in point["processes"].items()
            )
        )

    def slot_left(self, wid: str, old_pid: int) -> bool:
        try:
            w = self.relay.workers()[wid]
        except McrelayError:
            return False
        return bool(w["state"] != "running" or w["pid"] != old_pid)

    def account_relay_drops(self) -> None:
        """Kernel drops of the relay since the previous call, credited to the previous event.
        Asked once every rate reads 0 (each worker has reported since the traffic stopped);
        a restarted supervisor counts from zero."""

        def settled() -> dict[str, Any] | None:
            try:
                st: dict[str, Any] = self.relay.call(m.GetStats())
            except McrelayError:
                return None
            return st if all(r["pps_in"] == 0.0 for r in st["rules"]) else None

        stats = poll(settled, 5, 0.2)
        if stats is None:
            return
        ring = int(stats["kernel_drops"])
        errors = sum(o["errors"] for r in stats["rules"] for o in r["outputs"])
        instance, before = self.relay_drops
        if self.events and "relay_ring" not in self.events[-1].drops:
            same = instance == self.relay.instance
            self.events[-1].drops["relay_ring"] = ring - before[0] if same else ring
            self.events[-1].drops["relay_send_errors"] = errors - before[1] if same else errors
        self.relay_drops = (self.relay.instance, (ring, errors))

    def segment(self, ev: Event) -> None:
        c, rate = self.c, self.opts.rate
        log_at = self.relay.log.stat().st_size
        net_before = net_drops(c)
        with sinks(c) as sink_procs:
            gens: list[subprocess.Popen[str]] = []
            try:
                base = counter(c.sink, c.sink_if, "rx_packets")
                for i in range(STREAMS):
                    gens.append(
                        gen(
                            c.gen,
                            f"239.1.1.{i + 1}",
                            IN_PORT,
                            "--rate",
                            str(rate),
                            "--count",
                            str(int(rate * SEGMENT_MAX_S)),
                            "--size",
                            str(SIZE),
                            "--stream",
                            str(i),
                        )
                    )
                # traffic flows through the relay before anything happens
                flowing = STREAMS * max(10, int(rate * 0.05))
                if not poll(lambda: counter(c.sink, c.sink_if, "rx_packets") - base >= flowing, 15):
                    raise RuntimeError("no traffic reached the sink within 15 s")
                time.sleep(ev.pre_s)  # chaos interval
                ev.at_s = round(time.monotonic() - self.t0, 1)
                faults.inject(self, ev)
                time.sleep(self.rng.uniform(*TAIL_S))  # chaos interval
                sent = [stop_gen(g) for g in gens]
            finally:
                for g in gens:
                    end_process(g)
            self.wait_drained()
            reports = [sink_report(p) for p in sink_procs]
        ev.drops.update({k: v - net_before[k] for k, v in net_drops(c).items()})
        for i, (n, rep) in enumerate(zip(sent, reports, strict=True)):
            st = rep["streams"].get(str(i), {"unique": 0, "max_seq": -1})
            expected = max(n, st["max_seq"] + 1)  # seqs start at 0; SIGINT may undercount sent
            ev.sent += expected
            ev.lost_by_stream.append(expected - st["unique"])
            ev.duplicated += rep["duplicated"]
            ev.reordered += rep["reordered"]
            ev.corrupted += rep["corrupted"]
            ev.drops["sink_socket"] = ev.drops.get("sink_socket", 0) + (rep["socket_drops"] or 0)
            if set(rep["streams"]) - {str(i)}:
                ev.problems.append(f"sink {i} saw foreign streams {sorted(rep['streams'])}")
        ev.lost = sum(ev.lost_by_stream)
        with open(self.relay.log, "rb") as log:
            log.seek(log_at)
            ev.log_tracebacks = log.read().count(b"Traceback")

    def wait_drained(self) -> None:
        """Generators have stopped: wait until the sink's interface counter stands still."""
        last = [-1]

        def still() -> bool:
            now = counter(self.c.sink, self.c.sink_if, "rx_packets")
            same, last[0] = now == last[0], now
            return same

        poll(still, 5, 0.15)

    def pick(self, schedule: list[str]) -> tuple[str, float] | None:
        """The next kind and its pre-event interval, or None when no segment fits the budget."""
        left = self.budget_end - time.monotonic()
        pre = self.rng.uniform(*PRE_S)
        if schedule:
            kind = schedule.pop(0)
        else:
            weights = dict(WEIGHTS)
            if self.supervisor_kills_allowed > 0 and left > (self.budget_end - self.t0) / 2:
                weights["kill-supervisor"] = 1
            kinds = sorted(weights)
            kind = self.rng.choices(kinds, [weights[k] for k in kinds])[0]
        need = SEGMENT_OVERHEAD_S + pre + ESTIMATE_S[kind] + TAIL_S[1]
        if need > left:
            kind = "none"
            pre = min(pre, left - SEGMENT_OVERHEAD_S - TAIL_S[1])
            if pre < PRE_S[0]:
                return None
        if kind == "kill-supervisor":
            self.supervisor_kills_allowed -= 1
        return kind, pre

    def run(self) -> None:
        relay = self.relay
        self.log(SETTINGS_NOTE)
        relay.start()
        for i in range(STREAMS):
            rid = f"soak-base-{i}"
            self.base_ids.append(rid)
            error = self.add_rule(rid, f"239.1.1.{i + 1}", IN_PORT, [(sink_group(i), OUT_PORT, 16)])
            if error:
                raise RuntimeError(error)
        if not self.wait_healthy():
            raise RuntimeError("the relay did not come up:\n" + relay.log_tail())
        self.t0 = time.monotonic()
        self.budget_end = self.t0 + self.opts.duration_s
        self.supervisor_kills_allowed = max(1, int(self.opts.duration_s / 180))
        # every kind once (the supervisor first, so the last instance lives long enough for the
        # fd/RSS trend; then the data-path failures, longest first, so a short run on a slow
        # machine still has them), then weighted random choices; a kind that no longer fits the
        # budget becomes a baseline ("none")
        rest = ["kill-data", "kill-control", "churn"]
        self.rng.shuffle(rest)
        schedule = [
            "kill-supervisor",
            "stop-worker",
            "config-load",
            "link-flap",
            "pause-worker",
            "stop-supervisor",
            *rest,
        ]
        # the early checkpoint once every kind has happened (or half the budget is gone: a
        # short run on a slow machine), then one every CHECKPOINT_EVERY_S, and one at the end
        half = self.t0 + self.opts.duration_s / 2
        next_checkpoint = 0.0
        for _ in range(10_000):  # bounded; the budget ends it long before
            now = time.monotonic()
            if (not schedule or now >= half) and now >= next_checkpoint:
                self.checkpoint("early" if not self.checkpoints else "interval")
                next_checkpoint = time.monotonic() + CHECKPOINT_EVERY_S
            picked = self.pick(schedule)
            if picked is None:
                break
            self.account_relay_drops()
            ev = Event(kind=picked[0], pre_s=round(picked[1], 2))
            self.events.append(ev)
            try:
                self.segment(ev)
            except (RuntimeError, McrelayError, OSError, subprocess.SubprocessError) as exc:
                ev.problems.append(f"segment aborted: {exc}")
            self.problems += [f"{ev.kind} at {ev.at_s:.1f}s: {p}" for p in ev.problems]
            churn = ", ".join(f"{op['op']} {op['id']}" for op in ev.churn)
            self.log(
                f"{ev.kind:15} {ev.victim:26} recovery {fmt(ev.recovery_s):>6}s  "
                f"lost {ev.lost:6}/{ev.sent}"
                + (f" [drops: {nonzero(ev.drops)}]" if any(ev.drops.values()) else "")
                + (f" DUPLICATED {ev.duplicated}" if ev.duplicated else "")
                + (f" CORRUPTED {ev.corrupted}" if ev.corrupted else "")
                + (f"  churn: {churn}" if churn else "")
                + (f"  PROBLEM: {'; '.join(ev.problems)}" if ev.problems else "")
            )
            if any(p.startswith(("not recovered", "segment aborted")) for p in ev.problems):
                break  # nothing after this would mean anything
