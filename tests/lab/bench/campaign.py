"""The benchmark's campaign: the main comparison, the bisection per system and the extras,
each run recorded into results.json as it finishes."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import trio

from mcrelay import client
from mcrelay import rules as rules_mod
from mcrelay.ipc import messages as m
from tests.lab.bench.machine import machine
from tests.lab.bench.plot import write_plot
from tests.lab.bench.report import write_markdown
from tests.lab.bench.run import Runner
from tests.lab.bench.summary import summarize
from tests.lab.bench.systems import Holder, Mcrelay, System, base_rule, make_system
from tests.lab.bench.topology import placements, topology

EXTRAS = ("unroutable", "placement", "control", "rules", "fanout", "input", "priority")
PHASES = {  # the runs each extra records
    "unroutable": ("unroutable",),
    "placement": ("free", "single"),
    "control": ("control", "control-ref"),
    "rules": ("rules-1", "rules-1000"),
    "fanout": ("fanout-3",),
    "input": ("input-none", "input-join", "input-ring"),
    "priority": ("nice-0", "nice--10"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def describe(r: dict[str, Any]) -> str:
    rate = f"{r['target_pps'] // 1000}k" if r["target_pps"] else "unpaced"
    core = r["relay_core_us_per_pkt"]
    proc = r["relay_cpu_us_per_pkt"]
    return (
        f"{r['system']:<12} {r['phase']:<10} {rate:>8}: offered {r['offered_pps']:>9,.0f}"
        f"  at sink {r['achieved_pps']:>9,.0f} pps  loss {r['loss_pct']:7.3f}%"
        f"  cpu {proc if proc is not None else '-':>6} µs/pkt  core {core or '-':>6}"
        f"  p50/p99 {r['lat_p50_us']}/{r['lat_p99_us']} µs"
        f"  foreign {r['foreign_cpu_pct']}% (relay core {r.get('foreign_relay_core_pct', 0)}%)"
        f"{' DISTURBED' if r.get('disturbed') else ''}"
        + (f" (retried {len(r['discarded_attempts'])}x)" if r.get("discarded_attempts") else "")
    )


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.runner = Runner(a.size, a.flows, a.idle, a.retries, a.foreign_limit, a.quiet_wait)
        self.pl = placements(a.relay_cpu, a.other_cpu)
        self.results: dict[str, Any] = {
            "mode": "quick" if a.quick else "full",
            "machine": machine(),
            "config": {
                "count": a.count,
                "rates": a.rates,
                "repeat": a.repeat,
                "search_steps": a.search_steps,
                "size": a.size,
                "flows": a.flows,
                "relay_cpu": a.relay_cpu,
                "other_cpu": a.other_cpu,
                "loss_limit_pct": 0.1,
                "retries": a.retries,
                "quiet_wait_s": a.quiet_wait,
                "foreign_limit_pct": a.foreign_limit,
                "command": " ".join(["scripts/bench", *sys.argv[1:]]),
            },
            "generator": (
                "tests.lab.bench.traffic gen: UDP GSO (63 × 1024 B per message), cut into "
                "frames in software on the generator's veth (tx-udp-segmentation off)"
            ),
            "sink": "tests.lab.bench.traffic sink: TPACKET_V3 ring counter on the sink veth",
            "systems": {},
            "runs": [],
            "extras": {},
        }
        self.out = Path(a.out)

    # ------------------------------------------------------------ bookkeeping

    def record(self, r: dict[str, Any]) -> dict[str, Any]:
        self.results["runs"].append(r)
        log(describe(r))
        return r

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1) + "\n")

    def max_run_count(self, rate: int) -> int:
        """Search runs last at least 2 s (a short run can hide a relay that falls behind in its
        buffers) and at most as long as the slowest fixed run."""
        slowest = min((r for r in self.a.rates if r), default=50_000)
        longest = max(20_000, int(rate * self.a.count / slowest))
        return int(min(max(self.a.count, 2 * rate), longest))

    # ------------------------------------------------------------ main comparison

    def main_runs(self) -> None:
        for rep in range(self.a.repeat):
            for name in self.a.systems:
                sys_ = make_system(name)
                log(f"repeat {rep + 1}/{self.a.repeat}: {sys_.label}")
                with topology(self.pl["split"]) as topo, sys_.start(topo):
                    self.results["systems"].setdefault(
                        name, {"label": sys_.label, "info": sys_.info}
                    )
                    fixed = [
                        self.record(
                            self.runner.run_once(
                                sys_, rate, self.a.count, phase="fixed", repeat=rep
                            )
                        )
                        for rate in self.a.rates
                    ]
                    self.search(sys_, fixed, rep)
                self.save()

    def search(self, sys_: System, fixed: list[dict[str, Any]], rep: int) -> None:
        """Bisect between the highest lossless and the lowest lossy offered rate."""
        # Loss can come from outside (a shared machine), losslessness cannot: the highest
        # lossless run counts, and only lossy runs above it bound the search.
        lo = max((r["offered_pps"] for r in fixed if r["lossless"]), default=0)
        lossy = [r["offered_pps"] for r in fixed if not r["lossless"] and r["offered_pps"] > lo]
        if not lossy:
            return
        hi = min(lossy)
        steps, extra = self.a.search_steps, 3
        while steps > 0:
            rate = int(round((lo + hi) / 2 / 1000) * 1000)
            if not lo < rate < hi or hi - lo < 0.04 * hi:
                break
            r = self.record(
                self.runner.run_once(
                    sys_, rate, self.max_run_count(rate), phase="search", repeat=rep
                )
            )
            if r["lossless"]:
                lo = max(lo, r["offered_pps"])
            else:
                hi = min(hi, r["offered_pps"])
            steps -= 1
            if not steps and not lo and rate > 5_000 and extra:
                steps, extra = 1, extra - 1  # nothing lossless yet: halve again (3 times at most)

    # ------------------------------------------------------------ extras

    def best_rate(self, name: str, default: int = 100_000) -> int:
        best = self.results.get("summary", {}).get(name, {}).get("highest_lossless_pps")
        if not best:
            return default
        return int(best["median"] // 1000 * 1000) or default

    def unroutable(self) -> None:
        rate, count = 50_000, min(self.a.count, 100_000)
        runs = []
        for name in ("kernel", "socat", "mcrelay-1w"):
            sys_ = make_system(name)
            log(f"unroutable source: {sys_.label}")
            with topology(self.pl["split"], unroutable=True) as topo, sys_.start(topo):
                r = self.runner.run_once(sys_, rate, count, phase="unroutable")
                runs.append(self.record(r))
        self.results["extras"]["unroutable"] = {
            "description": (
                "relay-ns input address 10.200.9.2/24 on another subnet than the source "
                "10.200.1.1, rp_filter=1, no route back"
            ),
            "rate": rate,
            "count": count,
        }

    def placement(self) -> None:
        if self.a.quick:
            names, pls, rates = ["kernel", "socat", "mcrelay-1w"], ["free"], [0]
        else:
            names = ["gen-ceiling", "kernel", "socat", "mcrelay-1w", "mcrelay-2w"]
            pls, rates = ["free", "single"], [200_000, 0]
        for pl in pls:
            for name in names:
                sys_ = make_system(name)
                log(f"placement {pl}: {sys_.label}")
                with topology(self.pl[pl]) as topo, sys_.start(topo):
                    for rate in rates:
                        self.record(self.runner.run_once(sys_, rate, self.a.count, phase=pl))
        self.results["extras"]["placement"] = {"placements": pls, "rates": rates}

    def control(self) -> None:
        rate = self.best_rate("mcrelay-1w")
        seconds = 4 if self.a.quick else 10
        sys_ = Mcrelay(1)
        with topology(self.pl["split"]) as topo, sys_.start(topo):
            assert sys_.socket is not None
            path = sys_.socket
            idle = trio.run(_control_requests, path, time.monotonic() + 30, 100, "idle")
            sys_.set_rules([base_rule()])
            found: dict[str, Any] = {}

            def under_load() -> None:
                time.sleep(1.0)  # the generator is up by then
                found.update(
                    trio.run(_control_requests, path, time.monotonic() + seconds - 1.8, 100, "load")
                )

            t = threading.Thread(target=under_load)
            t.start()
            try:
                r = self.record(self.runner.run_once(sys_, rate, rate * seconds, phase="control"))
            finally:
                t.join()
            sys_.set_rules([base_rule()])
            quiet = self.record(
                self.runner.run_once(sys_, rate, rate * seconds, phase="control-ref")
            )
        self.results["extras"]["control"] = {
            "rate": rate,
            "idle": idle,
            "under_load": found,
            "loss_pct_with_requests": r["loss_pct"],
            "loss_pct_without": quiet["loss_pct"],
        }

    def rules(self) -> None:
        rate = self.best_rate("mcrelay-1w")
        sys_ = Mcrelay(1)
        many = [base_rule(), *_filler_rules(999)]
        info: dict[str, Any] = {"rate": rate, "install_s": []}
        with topology(self.pl["split"]) as topo, sys_.start(topo):
            for rep in range(self.a.repeat):
                for n, rules in ((1, [base_rule()]), (1000, many)):
                    took = sys_.set_rules(rules)
                    if n == 1000:
                        info["install_s"].append(round(took, 3))
                    for r in (rate, 0):
                        self.record(
                            self.runner.run_once(
                                sys_, r, self.a.count, phase=f"rules-{n}", repeat=rep
                            )
                        )
        self.results["extras"]["rules"] = info

    def fanout(self) -> None:
        rates = [100_000] if self.a.quick else [50_000, 100_000, 150_000, 200_000]
        sys_ = Mcrelay(1)
        with topology(self.pl["split"]) as topo, sys_.start(topo):
            sys_.set_rules([base_rule(outputs=3)])
            for rate in rates:
                self.record(self.runner.run_once(sys_, rate, self.a.count, phase="fanout-3"))
        self.results["extras"]["fanout"] = {"rates": rates, "outputs": 3}

    def input(self) -> None:
        """What the relay core spends on input before any relay runs, at one rate."""
        rate = 200_000
        for rep in range(self.a.repeat):
            for mode in ("none", "join", "ring"):
                sys_ = Holder(mode)
                log(f"input path: {sys_.label}")
                with topology(self.pl["split"]) as topo, sys_.start(topo):
                    self.record(
                        self.runner.run_once(
                            sys_, rate, self.a.count, phase=f"input-{mode}", repeat=rep
                        )
                    )
        self.results["extras"]["input"] = {"rate": rate}

    def priority(self) -> None:
        """mcrelay-1w with its data worker at nice 0 (as shipped) and at nice -10, past its
        limit: who wins the relay core, the worker or the kernel's receive work (ksoftirqd)?"""
        rates = [0] if self.a.quick else [450_000, 0]
        for nice in (0, -10):
            sys_ = Mcrelay(1)
            log(f"priority: data worker at nice {nice}")
            with topology(self.pl["split"]) as topo, sys_.start(topo):
                for w in sys_.info["workers"]:
                    if w["kind"] == "data":
                        os.setpriority(os.PRIO_PROCESS, w["pid"], nice)  # our own process
                for rate in rates:
                    self.record(
                        self.runner.run_once(sys_, rate, self.a.count, phase=f"nice-{nice}")
                    )
        self.results["extras"]["priority"] = {"nices": [0, -10], "rates": rates}

    def run(self) -> None:
        if self.a.extras_only:  # keep the main comparison of an earlier run, redo the extras
            old = json.loads((self.out / "results.json").read_text())
            redo = [e for e in EXTRAS if e not in self.a.skip]
            drop = {p for e in redo for p in PHASES[e]}
            old["runs"] = [r for r in old["runs"] if r["phase"] not in drop]
            for e in redo:
                old["extras"].pop(e, None)
            old.setdefault("reruns", []).append(
                {"extras": redo, "date": self.results["machine"]["date"]}
            )
            self.results = old
        else:
            self.main_runs()
        self.results["summary"] = summarize(self.results)
        self.save()
        for extra in EXTRAS:
            if extra in self.a.skip:
                continue
            try:
                getattr(self, extra)()
            except Exception as exc:  # record it, keep the other extras
                log(f"{extra} failed: {exc!r}")
                traceback.print_exc()
                self.results["extras"][extra] = {"error": repr(exc)}
            self.results["summary"] = summarize(self.results)
            self.save()
        self.report()

    def report(self) -> None:
        self.results["summary"] = summarize(self.results)
        self.save()
        write_markdown(self.results, self.out / "results.md")
        try:
            write_plot(self.results, self.out / "loss.png")
        except ImportError:
            log("matplotlib is missing: no loss.png (scripts/bench installs it)")
        log(f"wrote {self.out}/results.json, results.md, loss.png")


def _filler_rules(n: int) -> list[rules_mod.Rule]:
    out = []
    for i in range(n):
        hi, lo = divmod(i, 250)
        out.append(
            rules_mod.make_rule(
                interface="rin0",
                group=f"239.10.{hi}.{lo + 1}",
                port=5000 + (i % 7),
                outputs=[
                    rules_mod.Output(group=f"239.3.{hi}.{lo + 1}", port=5001, interface="rout0")
                ],
                rule_id=f"fill-{i}",
            )
        )
    return out


async def _control_requests(path: Path, until: float, n: int, tag: str) -> dict[str, Any]:
    """Alternate `workers` and `add` requests (each a new rule) until `n` of each or `until`."""
    lat: dict[str, list[float]] = {"workers": [], "add": []}
    i = 0
    while i < n and time.monotonic() < until:
        t = time.perf_counter()
        await client.request(path, m.ListWorkers())
        lat["workers"].append(time.perf_counter() - t)
        rule = rules_mod.make_rule(
            interface="rin0",
            group=f"239.20.{i // 250}.{i % 250 + 1}",
            port=6000,
            outputs=[rules_mod.Output(group="239.4.0.1", port=5001, interface="rout0")],
            rule_id=f"ctl-{tag}-{i}",
        )
        t = time.perf_counter()
        await client.request(path, m.AddRule(rule=rule))
        lat["add"].append(time.perf_counter() - t)
        i += 1
        await trio.sleep(0.01)
    out: dict[str, Any] = {}
    for k, v in lat.items():
        v.sort()
        out[k] = {
            "n": len(v),
            "p50_ms": round(statistics.median(v) * 1e3, 2) if v else None,
            "p99_ms": round(v[min(len(v) - 1, int(0.99 * len(v)))] * 1e3, 2) if v else None,
            "max_ms": round(v[-1] * 1e3, 2) if v else None,
        }
    return out
