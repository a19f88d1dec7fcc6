"""One measured run of scripts/bench: a sink, a generator, counters before and after.

`run_once` starts the counting sink (sink-ns), waits until it is ready, snapshots every
counter, runs the generator (gen-ns) to completion, tells the sink the generator is done,
collects its report, snapshots again and returns one flat result dict."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.lab.bench.systems import Mcrelay, System
from tests.lab.bench.topology import IN_GROUP, IN_PORT, PY, ROOT, TRAFFIC, cpu_list

LOSS_LIMIT = 0.1  # percent: "lossless" means below this
PACE = 0.95  # ... and the sink saw at least this share of the offered rate
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pids: list[int]) -> tuple[float, float]:
    """(utime+stime, on-CPU time from schedstat) in seconds, summed over `pids`."""
    ticks = 0
    sched_ns = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            sched_ns += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / CLK_TCK, sched_ns / 1e9


def cpu_times() -> dict[int, dict[str, float]]:
    """Per CPU, seconds: idle (+iowait) and steal, which NO_HZ kernels account precisely, and
    the tick-sampled user, system and softirq shares (a sample, not a measurement, on kernels
    without CONFIG_IRQ_TIME_ACCOUNTING)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *vals = line.split()
            v = [int(x) / CLK_TCK for x in vals] + [0.0] * 10
            out[int(name[3:])] = {
                "idle": v[3] + v[4],
                "steal": v[7],
                "user": v[0] + v[1],
                "system": v[2],
                "softirq": v[5] + v[6],
            }
    return out


def proc_table() -> dict[int, tuple[int, int, int, bool]]:
    """Every process: (parent, start time, utime+stime ticks, is a kernel thread)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            f = Path(entry.path, "stat").read_text().rsplit(") ", 1)[1].split()
            out[int(entry.name)] = (
                int(f[1]),
                int(f[19]),
                int(f[11]) + int(f[12]),
                bool(int(f[6]) & 0x00200000),  # PF_KTHREAD
            )
        except (OSError, IndexError, ValueError):
            pass
    return out


_KSOFTIRQD: set[int] = set()


def ksoftirqd() -> set[int]:
    if not _KSOFTIRQD:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if Path(entry.path, "comm").read_text().startswith("ksoftirqd/"):
                        _KSOFTIRQD.add(int(entry.name))
    return _KSOFTIRQD


def wait_quiet(max_wait: float, idle_share: float = 0.85, window: float = 0.25) -> float:
    """Wait (at most `max_wait` s) until every CPU was at least `idle_share` idle over one
    `window`: other users' bursts (test suites) and our own namespace teardown pass first.
    Returns the time waited."""
    t0 = time.monotonic()
    while True:
        a = cpu_times()
        time.sleep(window)
        b = cpu_times()
        if all((b[c]["idle"] - a[c]["idle"]) >= idle_share * window for c in a):
            break
        if time.monotonic() - t0 >= max_wait:
            break
    return round(time.monotonic() - t0, 2)


def foreign_cpu(before: dict[int, Any], after: dict[int, Any]) -> float:
    """CPU seconds that processes outside this benchmark used between two `proc_table`s: the
    machine may be shared. Ours: this process and everything it started (the relays, their
    workers, gen, sink, helpers). Kernel threads count (kworkers tearing down namespaces, ours
    or others', disturb a run just the same), except ksoftirqd, which carries our packets."""
    me = os.getpid()
    ours = {me}
    for table in (before, after):
        changed = True
        while changed:
            changed = False
            for pid, (ppid, *_rest) in table.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
    ticks = 0
    for pid, (_ppid, start, used, kthread) in after.items():
        if pid in ours or (kthread and pid in ksoftirqd()):
            continue
        old = before.get(pid)
        ticks += used - old[2] if old and old[1] == start else used
    return ticks / CLK_TCK


def softnet() -> dict[int, tuple[int, int]]:
    """Per CPU: (backlog drops, time squeezes) from /proc/net/softnet_stat."""
    out = {}
    for i, line in enumerate(Path("/proc/net/softnet_stat").read_text().splitlines()):
        f = line.split()
        cpu = int(f[12], 16) if len(f) > 12 else i
        out[cpu] = (int(f[1], 16), int(f[2], 16))
    return out


def link_drops(sys_: System) -> dict[str, int]:
    topo = sys_.topo
    assert topo is not None
    out = {}
    for ns, names in ((topo.relay, ("rin0", "rout0")), (topo.sink, ("sink0", "sdir0"))):
        for link in json.loads(ns.run("ip", "-s", "-j", "link", "show")):
            if link["ifname"] in names:
                st = link.get("stats64", {})
                out[f"{link['ifname']}_rx_dropped"] = st.get("rx", {}).get("dropped", 0)
                out[f"{link['ifname']}_tx_dropped"] = st.get("tx", {}).get("dropped", 0)
    return out


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def snapshot(sys_: System) -> dict[str, Any]:
    return {
        "t": time.monotonic(),
        "self": self_cpu(),
        "proc": proc_cpu(sys_.pids()),
        "cpu": cpu_times(),
        "procs": proc_table(),
        "softnet": softnet(),
        "links": link_drops(sys_),
        "counters": sys_.counters() if sys_.relays else {},
    }


@contextlib.contextmanager
def spawn(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()  # by this PID only
        proc.wait(timeout=10)


def read_json(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stdout], [], [], left)[0]:
            break
        line = proc.stdout.readline()
        if not line:
            break
        with contextlib.suppress(ValueError):
            return dict(json.loads(line))
    argv = list(proc.args) if isinstance(proc.args, list | tuple) else [proc.args]
    raise TimeoutError(f"no answer from {' '.join(map(str, argv[-12:]))}")


class Runner:
    def __init__(
        self,
        size: int,
        flows: int,
        idle: float,
        retries: int = 2,
        foreign_limit: float = 10.0,
        quiet_wait: float = 3.0,
    ) -> None:
        self.quiet_wait = quiet_wait
        self.size = size
        self.flows = flows
        self.idle = idle
        self.retries = retries
        self.foreign_limit = foreign_limit  # % of the machine's CPU used by other users' work
        self.index = 0  # run counter: each run gets its own stream ids

    def run_once(
        self, sys_: System, rate: int, count: int, *, phase: str, **extra: Any
    ) -> dict[str, Any]:
        """One run; repeated (up to `retries` times) while other users' load disturbed it."""
        earlier: list[dict[str, Any]] = []
        while True:
            waited = wait_quiet(self.quiet_wait)
            r = self._attempt(sys_, rate, count, phase, extra)
            r["quiet_wait_s"] = waited
            if not self._disturbed(r) or len(earlier) >= self.retries:
                break
            earlier.append({k: r[k] for k in ("offered_pps", "loss_pct", "foreign_cpu_pct")})
            time.sleep(1.0)
        r["disturbed"] = self._disturbed(r)
        r["discarded_attempts"] = earlier
        return r

    def _disturbed(self, r: dict[str, Any]) -> bool:
        """Others used more than `foreign_limit` % of the machine, or twice that of the relay
        core (sampled there: catches short-lived processes the process scan misses)."""
        return bool(
            r["foreign_cpu_pct"] > self.foreign_limit
            or r.get("foreign_relay_core_pct", 0.0) > 2 * self.foreign_limit
        )

    def _attempt(
        self, sys_: System, rate: int, count: int, phase: str, extra: dict[str, Any]
    ) -> dict[str, Any]:
        topo = sys_.topo
        assert topo is not None
        self.index += 1
        stream_base = (self.index % 100_000) * 16
        pl = topo.placement
        other = cpu_list(pl.other_cpus)
        duration = count / rate if rate else count / 150_000
        max_s = duration * 1.5 + 10
        outputs = len(sys_.out_groups())
        sink_argv = topo.sink.cmd(
            PY, *TRAFFIC, "sink", "--ifname", sys_.sink_if, "--flows", str(self.flows),
            "--stream-base", str(stream_base), "--max-seq", str(count),
            "--expect", str(count * outputs), "--idle", str(self.idle),
            "--cpu", other, "--max-seconds", str(max_s + 5),
        )  # fmt: skip
        gen_argv = topo.gen.cmd(
            PY, *TRAFFIC, "gen", "--ifname", sys_.gen_if, "--group", IN_GROUP,
            "--port", str(IN_PORT), "--rate", str(rate), "--count", str(count),
            "--size", str(self.size), "--flows", str(self.flows),
            "--stream-base", str(stream_base), "--cpu", other, "--max-seconds", str(max_s),
        )  # fmt: skip
        with spawn(sink_argv) as sink:
            read_json(sink, 20)
            before = snapshot(sys_)
            with spawn(gen_argv) as gen:
                read_json(gen, 20)
                g = read_json(gen, max_s + 10)
            gen_end = time.monotonic()
            assert sink.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                sink.stdin.write("done\n")
                sink.stdin.flush()
            s = read_json(sink, max_s + 10)
        if isinstance(sys_, Mcrelay):  # workers report counters once a second: let them settle
            time.sleep(max(0.0, gen_end + 1.2 - time.monotonic()))
            last = sys_.counters()
            for _ in range(3):
                time.sleep(1.1)
                now = sys_.counters()
                if now == last:
                    break
                last = now
        after = snapshot(sys_)
        return self._result(sys_, rate, count, phase, g, s, before, after, extra)

    def _result(
        self,
        sys_: System,
        rate: int,
        count: int,
        phase: str,
        g: dict[str, Any],
        s: dict[str, Any],
        before: dict[str, Any],
        after: dict[str, Any],
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        pl = sys_.topo.placement if sys_.topo else None
        outputs = len(sys_.out_groups())
        sent = g["sent"]
        expected = sent * outputs
        unique = s["unique"]
        lost = expected - unique
        loss = 100.0 * lost / expected if expected else 0.0
        wall = after["t"] - before["t"]
        utst = after["proc"][0] - before["proc"][0]
        sched = after["proc"][1] - before["proc"][1]
        cpus = sorted(after["cpu"])

        def delta(c: int, k: str) -> float:
            return float(after["cpu"][c][k] - before["cpu"][c][k])

        # busy = not idle and not stolen by the hypervisor: precise on NO_HZ kernels
        busy = {c: max(0.0, wall - delta(c, "idle") - delta(c, "steal")) for c in cpus}
        steal = {c: delta(c, "steal") for c in cpus}
        sn_drops = {c: after["softnet"][c][0] - before["softnet"][c][0] for c in after["softnet"]}
        squeeze = {c: after["softnet"][c][1] - before["softnet"][c][1] for c in after["softnet"]}
        links = {
            k: v - before["links"].get(k, 0)
            for k, v in after["links"].items()
            if v - before["links"].get(k, 0)
        }
        counters = {k: v - before["counters"].get(k, 0) for k, v in after["counters"].items()}
        relayed = max(unique, 1)
        foreign = foreign_cpu(before["procs"], after["procs"])
        foreign_pct = 100.0 * foreign / (wall * len(cpus)) if wall > 0 else 0.0
        relay_core = None
        core_split = None
        foreign_core_pct = 0.0
        if pl is not None and sys_.relays and len(pl.relay_cpus) == 1:
            (rc,) = pl.relay_cpus
            if rc not in pl.other_cpus:
                relay_core = round(busy[rc] * 1e6 / relayed, 3)
                core_split = {k: round(delta(rc, k), 3) for k in ("user", "system", "softirq")}
                core_split["busy"] = round(busy[rc], 3)
                # user+system time sampled on the relay CPU that the relay processes (pinned
                # there) were not charged: other users' processes, short-lived ones included
                others = delta(rc, "user") + delta(rc, "system") - (utst if sys_.pids() else 0.0)
                foreign_core_pct = max(0.0, 100.0 * others / wall) if wall > 0 else 0.0
        per_dest = {d: v["unique"] for d, v in s.get("by_dest", {}).items()}
        return {
            "system": sys_.name,
            "phase": phase,
            "placement": pl.name if pl else None,
            "target_pps": rate,
            "count": count,
            "outputs": outputs,
            "sent": sent,
            "offered_pps": g["pps"],
            "gen_retries": g["retries"],
            "received": unique,
            "per_dest": per_dest,
            "achieved_pps": s["pps"],
            "lost": lost,
            "loss_pct": round(loss, 4),
            # lossless: under the loss limit, and the relay kept pace (a relay that falls behind
            # only hides loss in its buffers until a longer run overflows them)
            "lossless": loss < LOSS_LIMIT and s["pps"] >= PACE * g["pps"],
            "kept_pace": s["pps"] >= PACE * g["pps"],
            "dup": s["dup"],
            "reordered": s["reord"],
            "lat_p50_us": s["lat_p50_us"],
            "lat_p99_us": s["lat_p99_us"],
            "lat_max_us": s["lat_max_us"],
            # utime+stime of every relay process, read as their precise sum (schedstat's
            # sum_exec_runtime); the tick-sampled /proc/PID/stat value is kept for reference
            "relay_cpu_s": round(sched, 4) if sys_.relays else None,
            "relay_cpu_us_per_pkt": (
                round(sched * 1e6 / relayed, 3) if sys_.relays and sys_.pids() else None
            ),
            "relay_ticks_us_per_pkt": (
                round(utst * 1e6 / relayed, 3) if sys_.relays and sys_.pids() else None
            ),
            "relay_core_us_per_pkt": relay_core if unique else None,
            "relay_core_us_per_sent": (
                round(core_split["busy"] * 1e6 / max(sent, 1), 3) if core_split else None
            ),
            "relay_core_s": core_split,
            "foreign_cpu_pct": round(foreign_pct, 1),
            "foreign_relay_core_pct": round(foreign_core_pct, 1),
            "gen_cpu_s": g.get("cpu_s"),
            "sink_cpu_s": s.get("cpu_s"),
            "wall_s": round(wall, 3),
            "cpu_busy_s": {str(c): round(v, 3) for c, v in busy.items()},
            "cpu_steal_s": {str(c): round(v, 3) for c, v in steal.items()},
            "softnet_drops": {str(c): v for c, v in sn_drops.items() if v},
            "softnet_squeezed": {str(c): v for c, v in squeeze.items() if v},
            "link_drops": links,
            "counters": counters,
            "sink_ring_drops": s["ring_drops"],
            **extra,
        }
