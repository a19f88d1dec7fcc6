"""Traffic lost when a data worker fails mid-stream, on the chain topology (scripts/measure-kill).

Each scenario starts its own relay (a real supervisor in relay-ns, one rule gen → sink), its own
sender (`mcrelay gen`, 1024-byte datagrams) and counter (`mcrelay sink`), makes a worker fail
and reports what the sink saw: datagrams lost (sent - unique received), duplicated, and the
longest silence between two datagrams (the sink's max_gap_us). Every run is bounded: the
stream by its --count, the sink by --idle-timeout/--duration, every wait by a deadline.
Prints one JSON document (every run's figures) on stdout and a table with the targets on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mcrelay.dataplane.capture import CAPTURE_RING
from mcrelay.supervisor.settings import SupervisorSettings
from tests.lab import topology
from tests.lab.daemon import Daemon, heartbeat_timeout, is_worker, pid_alive
from tests.lab.measure.restart import holds, kill_to_running, table_holdings
from tests.lab.processes import end_process, poll, wait_for
from tests.lab.relay import Sink, gen, relay_daemon, sink

SIZE = 1024
IN_GROUP, IN_PORT, OUT_GROUP, OUT_PORT = "239.1.1.1", 5000, "239.2.2.2", 5001
STREAM_S = 3.5  # a kill scenario's stream; the failure comes KILL_AT_S into it
KILL_AT_S = 1.5
IDLE_S = 1.0  # the sink ends this long after the last datagram (longer than a takeover's gap)
# Datagrams one ring block holds: a frame takes its tpacket3_hdr and sockaddr_ll (80 bytes with
# alignment), Ethernet, IPv4 and UDP headers and the payload, rounded up to 16 bytes.
RING_BLOCK = CAPTURE_RING.block_size // ((80 + 42 + SIZE + 15) // 16 * 16)
DATA_TIMEOUT_S = heartbeat_timeout("data")
REPEAT_KILLS, REPEAT_SPACING_S = 20, 1.0
REPEAT_WAIT_S = 5.0  # repeat-20 gives up when the worker is not running this long after a kill
LATENCY_KILLS, LATENCY_STABLE_S = 20, 0.5
_TOOK_OVER = re.compile(
    r"took over a ring holding (\d+) frames in (\d+) blocks(?:, (\d+) of them)?"
)
_RESTARTS_IN = re.compile(r"worker data-0 restarts in ([0-9.]+) s")
_SENT = re.compile(r"sent (\d+)/")


@contextlib.contextmanager
def relay(*args: str) -> Iterator[tuple[topology.Chain, Daemon]]:
    """The chain with a relay of one rule, every data worker running and holding it."""
    with (
        topology.chain() as c,
        tempfile.TemporaryDirectory() as tmp,
        relay_daemon(c.relay, Path(tmp), *args) as d,
    ):
        output = f"{OUT_GROUP}:{OUT_PORT}:{c.relay_out}"
        d.ok("add", "--input-interface", c.relay_in, "--input-group", IN_GROUP,
             "--input-port", str(IN_PORT), "--output", output)  # fmt: skip
        want = table_holdings(d)
        wait_for(lambda: all(holds(w, want) for w in _data(d)), timeout=10)
        yield c, d


def _data(d: Daemon) -> list[dict[str, Any]]:
    return [w for w in d.workers().values() if w["kind"] == "data"]


class Stream:
    """One gen → relay → sink stream of ``rate`` pps for ``seconds``, begun at ``started``."""

    def __init__(self, c: topology.Chain, s: Sink, rate: int, seconds: float) -> None:
        self.count = int(rate * seconds)
        self.sink = s
        self.gen = gen(c.gen, IN_GROUP, IN_PORT, "--rate", str(rate), "--count", str(self.count),
                       "--size", str(SIZE))  # fmt: skip
        self.started = time.monotonic()
        self.timeout = seconds + 30
        self.report: dict[str, Any] = {}  # the sink's, once finished

    def at(self, offset: float) -> None:
        """Until ``offset`` seconds into the stream: the stream is the clock here."""
        time.sleep(max(0.0, self.started + offset - time.monotonic()))

    def stop(self) -> None:
        end_process(self.gen, signal.SIGINT)

    def finish(self) -> dict[str, Any]:
        """Wait for the sender and the sink; what was lost, duplicated, and the longest gap."""
        out, err = self.gen.communicate(timeout=self.timeout)
        found = _SENT.search(out)
        assert found and self.gen.returncode in (0, 130), f"gen failed: {err or out}"
        sent = int(found[1])
        r = self.report = self.sink.result(timeout=self.timeout)
        unique = sum(st["unique"] for st in r["streams"].values())
        last = max((st["max_seq"] for st in r["streams"].values()), default=-1)
        gap = r["max_gap_us"]
        return {
            "sent": sent,
            "received": r["received"],
            "lost": sent - unique,
            "duplicated": r["duplicated"],
            "max_gap_ms": round(gap / 1000, 1) if gap is not None else None,
            "last_arrived": last == sent - 1,
            "sink_socket_drops": r["socket_drops"],
        }


@contextlib.contextmanager
def stream(c: topology.Chain, rate: int, seconds: float, idle: float = IDLE_S) -> Iterator[Stream]:
    bounds = ("--idle-timeout", str(idle), "--duration", str(seconds + idle + 20))
    with sink(c.sink, OUT_GROUP, OUT_PORT, c.sink_if, "--expect-size", str(SIZE), *bounds) as s:
        st = Stream(c, s, rate, seconds)
        try:
            yield st
        finally:
            end_process(st.gen)


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _carrier(d: Daemon) -> dict[str, Any]:
    """The data worker that carries the flow: the one that has used the most CPU."""
    return max(_data(d), key=lambda w: _cpu_ticks(w["pid"]))


# --- scenarios ---------------------------------------------------------------------------------


def kill_mid_stream(workers: int, rate: int) -> dict[str, Any]:
    pin = ("--pin-workers",) if workers > 1 else ()
    with relay("--num-workers", str(workers), *pin) as (c, d), stream(c, rate, STREAM_S) as st:
        st.at(KILL_AT_S)
        victim = _carrier(d)
        log_at = d.log.stat().st_size
        t0 = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        d.wait_replaced(victim["id"], victim["pid"])
        replaced_s = time.monotonic() - t0
        figures = st.finish()
        took_over = _TOOK_OVER.search(d.log.read_text()[log_at:])
        return {
            **figures,
            "victim": victim["id"],
            "running_again_s": round(replaced_s, 3),
            # What the replacement found in the ring: the frames that waited, and those of a
            # block the killed worker had half sent (relayed again: skipping it instead would
            # have lost every one of them that had not left yet).
            "waited_frames": int(took_over[1]) if took_over else 0,
            "half_sent_frames": int(took_over[3] or 0) if took_over else 0,
        }


def stop_mid_stream() -> dict[str, Any]:
    """SIGSTOP the only data worker; how long until data-0 has a new pid, then SIGCONT the old."""
    seconds, idle = KILL_AT_S + DATA_TIMEOUT_S + 2.0, DATA_TIMEOUT_S + 2.0
    with relay("--num-workers", "1") as (c, d), stream(c, 5000, seconds, idle) as st:
        st.at(KILL_AT_S)
        old = d.workers()["data-0"]["pid"]
        t0 = time.monotonic()
        os.kill(old, signal.SIGSTOP)
        try:
            new = poll(
                lambda: d.workers()["data-0"]["pid"] not in (old, None),
                timeout=DATA_TIMEOUT_S + 10,
                interval=0.005,
            )
            detected_s = time.monotonic() - t0
        finally:
            if pid_alive(old) and is_worker(old):  # normally killed by the supervisor by now
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old, signal.SIGCONT)
        assert new, f"data-0 not replaced within {DATA_TIMEOUT_S + 10:g} s of SIGSTOP"
        d.wait_replaced("data-0", old)
        return {**st.finish(), "new_pid_s": round(detected_s, 3)}


def restart_latency() -> dict[str, Any]:
    """kill -9 → replacement running with the table's rules, each kill a first failure."""
    args = ("--num-workers", "1", "--stable-after", str(LATENCY_STABLE_S), "--max-failures", "1000")
    with relay(*args) as (_, d):
        samples = [kill_to_running(d, "data-0", LATENCY_STABLE_S) for _ in range(LATENCY_KILLS)]
    ms = [round(s * 1000, 1) for s in samples]
    return {"median_ms": round(statistics.median(ms), 1), "max_ms": max(ms), "samples_ms": ms}


def repeat_kills() -> dict[str, Any]:
    """20 kills 1 s apart at 20k pps, default supervisor settings; still relaying at the end?"""
    seconds = KILL_AT_S + REPEAT_KILLS * REPEAT_SPACING_S + 3.0
    kills: list[dict[str, Any]] = []
    kill_ns: list[int] = []
    with (
        relay("--num-workers", "1") as (c, d),
        stream(c, 20_000, seconds, REPEAT_WAIT_S + 1) as st,
    ):
        st.at(KILL_AT_S)
        last_kill = 0.0
        for _ in range(REPEAT_KILLS):
            time.sleep(max(0.0, last_kill + REPEAT_SPACING_S - time.monotonic()))
            old = d.workers()["data-0"]["pid"]
            log_at = d.log.stat().st_size
            last_kill = time.monotonic()
            kill_ns.append(time.time_ns())  # the sink stamps datagrams with this clock
            os.kill(old, signal.SIGKILL)
            up = poll(functools.partial(_running_anew, d, old), REPEAT_WAIT_S, interval=0.005)
            took = time.monotonic() - last_kill
            found = _RESTARTS_IN.search(d.log.read_text()[log_at:])
            kills.append({
                "backoff_s": float(found[1]) if found else None,
                "running_again_s": round(took, 3) if up else None,
            })  # fmt: skip
            if not up:
                st.stop()  # the relay is down: the rest of the stream would only count as lost
                break
        state = d.workers()["data-0"]["state"]
        figures = st.finish()
    per_kill = _lost_per_kill(kill_ns, st.report["gaps"])
    for i, (kill, lost) in enumerate(zip(kills, per_kill, strict=True)):
        kill["lost"] = lost if kill["running_again_s"] is not None else None  # lost: the tail
        print(f"  kill {i + 1:2}: backoff {kill['backoff_s']} s, running again after "
              f"{kill['running_again_s']} s, lost {kill['lost']}", file=sys.stderr)  # fmt: skip
    attributed = sum(k["lost"] or 0 for k in kills)
    relaying = bool(len(kills) == REPEAT_KILLS and state == "running" and figures["last_arrived"])
    return {**figures, "kills_done": len(kills), "final_state": state,
            "relaying_at_end": relaying, "lost_unattributed": figures["lost"] - attributed,
            "kills": kills}  # fmt: skip


def _lost_per_kill(kill_ns: list[int], gaps: list[dict[str, Any]]) -> list[int | None]:
    """Datagrams missing across the sink's silences that began at or just after each kill (and
    before the next); None where such a silence has no count (no silence at all: 0)."""
    slack = 20_000_000  # the last datagram before the silence may precede the kill a little
    bounds = [*kill_ns[1:], 2**63]
    out: list[int | None] = []
    for start, end in zip(kill_ns, bounds, strict=True):
        mine = [g for g in gaps if start - slack <= g["start_ns"] < end - slack]
        counts = [g["missing"] for g in mine]
        out.append(None if None in counts else sum(counts))
    return out


def _running_anew(d: Daemon, old_pid: int) -> bool:
    w = d.workers()["data-0"]
    return bool(w["pid"] not in (old_pid, None) and w["state"] == "running")


# --- targets, runs and the report --------------------------------------------------------------


def _le(key: str, bound: float) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get(key) is not None and m[key] <= bound


def _all(*checks: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
    return lambda m: all(check(m) for check in checks)


@dataclasses.dataclass(frozen=True)
class Scenario:
    run: Callable[[], dict[str, Any]]
    target: str
    #: Judged on the medians over the runs.
    passes: Callable[[dict[str, Any]], bool]
    #: The figures of the table.
    shown: tuple[str, ...] = ("lost", "duplicated", "max_gap_ms")


SCENARIOS = {
    "kill-1w-20k": Scenario(
        lambda: kill_mid_stream(1, 20_000),
        f"0 lost, dup <= {RING_BLOCK} (a ring block), gap <= 50 ms",
        _all(_le("lost", 0), _le("duplicated", RING_BLOCK), _le("max_gap_ms", 50)),
    ),
    "kill-1w-100k": Scenario(
        lambda: kill_mid_stream(1, 100_000),
        "lost <= 100, gap <= 50 ms",
        _all(_le("lost", 100), _le("max_gap_ms", 50)),
    ),
    "kill-2w-100k": Scenario(lambda: kill_mid_stream(2, 100_000), "0 lost", _le("lost", 0)),
    "stop-1w-5k": Scenario(
        stop_mid_stream,
        "new pid <= 0.5 s, lost <= 100",
        _all(_le("new_pid_s", 0.5), _le("lost", 100)),
        ("new_pid_s", "lost", "duplicated", "max_gap_ms"),
    ),
    "restart-latency": Scenario(
        restart_latency, "median <= 30 ms", _le("median_ms", 30), ("median_ms", "max_ms")
    ),
    "repeat-20": Scenario(
        repeat_kills,
        f"relaying after {REPEAT_KILLS} kills",
        lambda m: m.get("relaying_at_end") == 1,
        ("kills_done", "relaying_at_end", "lost", "max_gap_ms"),
    ),
}


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric figure over the runs that finished (booleans as 0/1)."""
    keys = {k for r in runs for k, v in r.items() if isinstance(v, (int, float))}
    out: dict[str, Any] = {}
    for key in sorted(keys):
        values = [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]
        median = statistics.median(values) if values else None
        out[key] = (
            None if median is None else int(median) if median.is_integer() else round(median, 3)
        )
    return out


def measure(name: str, runs: int) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    done: list[dict[str, Any]] = []
    for i in range(runs):
        t0 = time.monotonic()
        try:
            figures = scenario.run()
        except Exception as exc:  # a failed run is a figure too; the others still run
            figures = {"error": f"{type(exc).__name__}: {str(exc)[-500:]}"}
        figures["took_s"] = round(time.monotonic() - t0, 1)
        done.append(figures)
        print(f"{name} run {i + 1}/{runs}: {_brief(figures, scenario.shown)}", file=sys.stderr)
    ok = [r for r in done if "error" not in r]
    medians = _medians(ok)
    passed = len(ok) == len(done) and scenario.passes(medians)
    return {"target": scenario.target, "pass": passed, "median": medians, "runs": done}


def _brief(figures: dict[str, Any], keys: tuple[str, ...]) -> str:
    if "error" in figures:
        return "error " + str(figures["error"]).splitlines()[0][:120]
    return "  ".join(f"{k} {figures.get(k)}" for k in keys)


def table(results: dict[str, dict[str, Any]]) -> str:
    """scenario | medians | target | pass/FAIL, in columns as wide as their widest cell."""
    rows = [("scenario", "median over the runs", "target", "result")]
    for name, r in results.items():
        shown = "  ".join(f"{k} {r['median'].get(k)}" for k in SCENARIOS[name].shown)
        rows.append((name, shown, r["target"], "pass" if r["pass"] else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/measure-kill", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="runs per scenario (default 5)")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="SCENARIO",
                        help=f"only these scenarios: {', '.join(SCENARIOS)}")  # fmt: skip
    args = parser.parse_args(argv)
    if not topology.have_netns():
        parser.error("needs root and ip netns")
    defaults = SupervisorSettings()
    results = {name: measure(name, args.runs) for name in args.only or SCENARIOS}
    doc = {
        "settings": {
            "runs": args.runs,
            "datagram_bytes": SIZE,
            "ring_block_datagrams": RING_BLOCK,
            "data_heartbeat_timeout_s": DATA_TIMEOUT_S,
            "control_heartbeat_timeout_s": defaults.heartbeat_timeout,
            "first_backoff_s": defaults.backoff.initial,
        },
        "scenarios": results,
    }
    print(json.dumps(doc, indent=2))
    print(table(results), file=sys.stderr)
    return 0 if all(r["pass"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
