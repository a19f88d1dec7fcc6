"""Traffic through the chain: one sink per stream, the generators' counts, and the drop
counters along the path."""

from __future__ import annotations

import contextlib
import json
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.lab import topology
from tests.lab.processes import end_process
from tests.lab.relay import mcrelay
from tests.lab.soak.settings import OUT_PORT, SEGMENT_MAX_S, STREAMS


def net_drops(c: topology.Chain) -> dict[str, int]:
    """Drop counters along the path (veth pairs) and the host's per-CPU backlog drops."""
    with open("/proc/net/softnet_stat") as f:
        backlog = sum(int(line.split()[1], 16) for line in f)
    return {
        "gen_tx": counter(c.gen, c.gen_if, "tx_dropped"),
        "relay_in_rx": counter(c.relay, c.relay_in, "rx_dropped"),
        "relay_out_tx": counter(c.relay, c.relay_out, "tx_dropped"),
        "sink_rx": counter(c.sink, c.sink_if, "rx_dropped"),
        "backlog_host": backlog,
    }


def sink_group(i: int) -> str:
    return f"239.2.2.{i + 1}"


def counter(ns: topology.Netns, interface: str, name: str) -> int:
    return int(ns.run("cat", f"/sys/class/net/{interface}/statistics/{name}").strip())


@contextlib.contextmanager
def sinks(c: topology.Chain) -> Iterator[list[subprocess.Popen[str]]]:
    """One sink per stream, all joined ("ready") before this yields; no idle stop (a supervisor
    restart is a silence); bounded by --duration and ended by SIGINT, which prints the report."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(STREAMS):
            procs.append(
                subprocess.Popen(
                    mcrelay(
                        c.sink,
                        "sink",
                        "--group",
                        sink_group(i),
                        "--port",
                        str(OUT_PORT),
                        "--interface",
                        c.sink_if,
                        "--json",
                        "--idle-timeout",
                        "0",
                        "--duration",
                        str(SEGMENT_MAX_S + 30),
                    ),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + 15
        for proc in procs:
            assert proc.stderr is not None
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("a sink did not become ready within 15 s")
                if select.select([proc.stderr], [], [], left)[0]:
                    line = proc.stderr.readline()
                    if not line:
                        raise RuntimeError("a sink exited before it was ready")
                    if line.startswith("ready"):
                        break
        yield procs
    finally:
        for proc in procs:
            end_process(proc)


def _where(pid: int) -> str:
    """What a stuck process is doing, for the report."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError as exc:
        return str(exc)
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    keep = ("State", "SigBlk", "SigIgn", "SigCgt", "Threads")
    return f"wchan {wchan}, " + ", ".join(f"{k} {fields.get(k, '?').strip()}" for k in keep)


def sink_report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    if proc.returncode != 0:
        raise RuntimeError(f"sink failed ({proc.returncode}): {err.strip()}")
    return dict(json.loads(out))


def stop_gen(proc: subprocess.Popen[str]) -> int:
    """SIGINT (exit 130, summary printed) or already done (0); returns datagrams sent."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"gen (pid {proc.pid}) ignored SIGINT for 15 s: {_where(proc.pid)}"
        ) from None
    match = re.search(r"sent (\d+)/", out)
    if proc.returncode not in (0, 130) or not match:
        raise RuntimeError(f"gen failed ({proc.returncode}): {err.strip() or out.strip()}")
    return int(match[1])


# --- the soak -------------------------------------------------------------------------------
