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

import trio

from mcrelay import client
from mcrelay.ipc import messages as m
from mcrelay.supervisor.backoff import BackoffPolicy
from tests.lab.daemon import daemon, wait_for

FIRST_BACKOFF = BackoffPolicy().initial  # the default first delay


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
        samples = []
        for _ in range(n):
            old = d.workers()["data-0"]
            time.sleep(0.6)  # past --stable-after, so each kill is a first failure (250 ms)
            t0 = time.monotonic()
            os.kill(old["pid"], signal.SIGKILL)

            def replaced(old_pid: int = old["pid"]) -> bool:
                w = d.workers()["data-0"]
                return bool(w["pid"] != old_pid and w["state"] == "running" and w["rules"] == 2)

            wait_for(replaced, timeout=10, interval=0.005)
            samples.append(time.monotonic() - t0)

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
            "note": "includes the 250 ms first backoff",
        },
        # What a spawn costs: fork from the pre-loaded spawner, privilege drop, hello, rule sync.
        "beyond_backoff_ms": {
            "median": round((statistics.median(samples) - FIRST_BACKOFF) * 1000, 1),
            "min": round((min(samples) - FIRST_BACKOFF) * 1000, 1),
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
