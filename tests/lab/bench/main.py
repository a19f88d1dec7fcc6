"""scripts/bench's options and entry point."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.lab import bench as package
from tests.lab.bench.campaign import EXTRAS, Bench, log
from tests.lab.bench.plot import write_plot
from tests.lab.bench.report import write_markdown
from tests.lab.bench.summary import summarize
from tests.lab.bench.systems import SYSTEMS
from tests.lab.bench.topology import ROOT


def parse_rates(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("0", "unpaced", "max"):
            out.append(0)
        else:
            out.append(int(float(part[:-1]) * 1000) if part.endswith("k") else int(part))
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description=package.__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="200k datagrams, fewer rates, 1 repeat")
    p.add_argument("--repeat", type=int, help="repeats of the main comparison (2; quick 1)")
    p.add_argument("--count", type=int, help="datagrams per run (1000000; quick 200000)")
    p.add_argument("--rates", type=parse_rates, help="offered pps, 0 = unpaced (e.g. 50k,100k,0)")
    p.add_argument("--search-steps", type=int, help="bisection steps per system (4; quick 2)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"any of {','.join(SYSTEMS)}")
    p.add_argument("--skip", default="", help=f"extras to leave out: {','.join(EXTRAS)}")
    p.add_argument("--size", type=int, default=1024, help="UDP payload bytes")
    p.add_argument("--flows", type=int, default=4, help="generator flows (source ports)")
    p.add_argument("--relay-cpu", type=int, default=1)
    p.add_argument("--other-cpu", type=int, default=0, help="generator and sink CPU")
    p.add_argument("--idle", type=float, default=0.5, help="sink: seconds of silence that end it")
    p.add_argument(
        "--retries", type=int, help="re-runs of a run disturbed by others' CPU load (2; quick 1)"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="wait up to this long (s) for idle CPUs before a run (3; quick 1)",
    )
    p.add_argument(
        "--foreign-limit", type=float, default=10.0,
        help="%% of the machine's CPU used by other processes above which a run is disturbed",
    )  # fmt: skip
    p.add_argument("--out", help="results directory")
    p.add_argument("--report-only", action="store_true", help="rewrite md/png from results.json")
    p.add_argument(
        "--extras-only",
        action="store_true",
        help="redo only the extras (not --skip'ped) into an existing OUT/results.json",
    )
    a = p.parse_args()
    q = a.quick
    a.repeat = a.repeat or (1 if q else 2)
    a.count = a.count or (200_000 if q else 1_000_000)
    a.retries = a.retries if a.retries is not None else (1 if q else 2)
    a.quiet_wait = a.quiet_wait if a.quiet_wait is not None else (1.0 if q else 3.0)
    full_rates = [50_000, 100_000, 200_000, 400_000, 0]
    a.rates = a.rates or ([100_000, 200_000, 400_000, 0] if q else full_rates)
    a.search_steps = a.search_steps if a.search_steps is not None else (2 if q else 4)
    a.systems = [s for s in a.systems.split(",") if s]
    a.skip = {s for s in a.skip.split(",") if s}
    a.out = a.out or str(ROOT / "docs" / "benchmarks" / ("quick" if q else ""))
    if unknown := set(a.systems) - set(SYSTEMS):
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if unknown := a.skip - set(EXTRAS):
        p.error(f"unknown extras: {', '.join(sorted(unknown))}")
    if a.report_only:
        results = json.loads((Path(a.out) / "results.json").read_text())
        results["summary"] = summarize(results)
        write_markdown(results, Path(a.out) / "results.md")
        write_plot(results, Path(a.out) / "loss.png")
        return
    if os.geteuid() != 0:
        p.error("needs root (network namespaces); run it as root through scripts/bench")
    if max(a.relay_cpu, a.other_cpu) >= (os.cpu_count() or 1) or a.relay_cpu == a.other_cpu:
        p.error("--relay-cpu and --other-cpu must be two different CPUs of this machine")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds every context manager: processes, namespaces

    signal.signal(signal.SIGTERM, on_term)
    os.sched_setaffinity(0, {a.other_cpu})  # the driver stays off the relay's CPU
    t0 = time.monotonic()
    bench = Bench(a)
    try:
        bench.run()
    finally:
        if not a.extras_only:
            bench.results["elapsed_s"] = round(time.monotonic() - t0, 1)
        bench.save()
    log(f"done in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
