"""Kill-to-running and control-latency figures for a real daemon (see scripts/measure-restart)."""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from mcrelay import client, rules
from mcrelay.ipc import messages as m
from mcrelay.supervisor.backoff import BackoffPolicy
from tests.lab.daemon import Daemon, daemon, wait_for

FIRST_BACKOFF = BackoffPolicy().delay(1)  # the default delay after a first failure (none)


def table_holdings(d: Daemon) -> tuple[int, str]:
    """How many rules the daemon's table holds, and their digest (what a synced worker acks)."""
    table = client.ask(d.socket, m.ListRules(), timeout=10)
    return len(table.rules), rules.digest(info.rule for info in table.rules)


def holds(worker: dict[str, Any], want: tuple[int, str]) -> bool:
    """The worker is running and acknowledged ``want`` (`table_holdings`)."""
    return bool(worker["state"] == "running" and (worker["rules"], worker["digest"]) == want)


def kill_to_running(d: Daemon, worker_id: str, stable_after: float) -> float:
    """SIGKILL ``worker_id`` once it has run past ``stable_after`` (so this is a first failure)
    and return the seconds until a replacement is running with the table's rules (count and
    digest both acknowledged)."""
    want = table_holdings(d)
    old = d.wait_running()[worker_id]
    came_up = time.monotonic()  # it was running by now at the latest
    # Waiting on the clock, not on a condition: the kill must come past --stable-after.
    time.sleep(max(0.0, came_up + stable_after + 0.1 - time.monotonic()))
    t0 = time.monotonic()
    os.kill(old["pid"], signal.SIGKILL)

    def synced() -> bool:
        w = d.workers()[worker_id]
        return w["pid"] != old["pid"] and holds(w, want)

    wait_for(synced, timeout=10, interval=0.005)
    return time.monotonic() - t0


def main(n: int) -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        daemon(
            Path(tmp), "--num-workers", "2", "--stable-after", "0.5", "--max-failures", "1000"
        ) as d,
    ):
        d.wait_running()
        d.ok(
            "add",
            "--input-interface",
            "in0",
            "--input-group",
            "239.1.1.1",
            "--input-port",
            "5000",
            "--output",
            "239.9.9.9:6000:out0",
        )
        d.ok(
            "add",
            "--input-interface",
            "in0",
            "--input-group",
            "239.1.1.2",
            "--input-port",
            "5000",
            "--output",
            "239.9.9.9:6001:out0",
        )
        samples = [kill_to_running(d, "data-0", stable_after=0.5) for _ in range(n)]

        async def control_latency() -> list[float]:
            out = []
            for _ in range(200):
                t = time.perf_counter()
                await client.request(d.socket, m.ListWorkers())
                out.append(time.perf_counter() - t)
            return out

        lat = sorted(trio.run(control_latency))
        cli_times = []
        for _ in range(10):
            t = time.perf_counter()
            d.ok("workers")
            cli_times.append(time.perf_counter() - t)
    result = {
        "kill_to_running_with_rules_s": {
            "n": n,
            "median": round(statistics.median(samples), 3),
            "min": round(min(samples), 3),
            "max": round(max(samples), 3),
            "note": f"includes the first failure's backoff ({FIRST_BACKOFF:g} s)",
        },
        "workers_request_ms": {
            "p50": round(lat[len(lat) // 2] * 1000, 2),
            "p99": round(lat[int(len(lat) * 0.99)] * 1000, 2),
        },
        "mcrelay_workers_cli_ms_median": round(statistics.median(cli_times) * 1000, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
