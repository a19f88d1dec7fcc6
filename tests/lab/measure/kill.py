"""Packets lost when one of two data workers is killed mid-stream (see scripts/measure-kill)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.lab import topology
from tests.lab.relay import gen, relay_daemon, sink


def once(rate: int, seconds: float) -> dict[str, float]:
    count = int(rate * seconds)
    with (
        topology.chain() as c,
        tempfile.TemporaryDirectory() as tmp,
        relay_daemon(c.relay, Path(tmp), "--num-workers", "2", "--pin-workers") as d,
    ):
        d.ok("add", "--input-interface", c.relay_in, "--input-group", "239.1.1.1",
             "--input-port", "5000", "--output", f"239.2.2.2:5001:{c.relay_out}")  # fmt: skip
        with sink(c.sink, "239.2.2.2", 5001, c.sink_if, "--count", str(count),
                  "--idle-timeout", "3") as s:  # fmt: skip
            stream = gen(c.gen, "239.1.1.1", 5000, "--rate", str(rate), "--count", str(count))
            time.sleep(seconds / 2)  # mid-stream: the stream is the clock here
            # Kill the worker that carries the flow: the one that has used the most CPU.
            victim = max(
                (w for w in d.workers().values() if w["kind"] == "data"),
                key=lambda w: _cpu_ticks(w["pid"]),
            )
            os.kill(victim["pid"], signal.SIGKILL)
            stream.communicate(timeout=seconds * 4)
            report = s.result(timeout=seconds * 4)
    lost = int(report["lost"])
    return {"rate_pps": rate, "sent": count, "lost": lost, "lost_ms": round(lost / rate * 1000, 1)}


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def main() -> None:
    rate = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    results = [once(rate, 4.0) for _ in range(runs)]
    print(json.dumps({"runs": results, "target": "< 0.1 s worth of packets"}, indent=2))


if __name__ == "__main__":
    main()
