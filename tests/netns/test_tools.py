"""gen → sink over a veth between two namespaces, as real processes (`python -m mcrelay`).

Topology: gen-ns g0 (10.200.9.1) ── veth ── s0 (10.200.9.2) sink-ns. In gen-ns 239.0.0.0/8
routes out of g0, but 239.2.0.0/16 routes into a dead-end veth (d0), so datagrams to 239.2.x.x
reach the sink only if --interface or --source really pick the egress.

The sink says "ready" on stderr once joined; the test waits for that line under a deadline.
Every process is killed by PID and reaped in `finally`; each run is bounded by --count and
--duration, and by subprocess timeouts.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab import topology

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
]

GEN_ADDR, SINK_ADDR, OTHER_ADDR = "10.200.9.1", "10.200.9.2", "10.200.8.1"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[topology.Netns, topology.Netns]]:
    with topology.namespaces("tgen", "tsink") as ns:
        gen, sink = ns["tgen"], ns["tsink"]
        topology.veth(gen, "g0", f"{GEN_ADDR}/24", sink, "s0", f"{SINK_ADDR}/24")
        gen.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")  # a dead end
        gen.ip("addr", "add", f"{OTHER_ADDR}/24", "dev", "d0")
        gen.ip("link", "set", "d0", "up")
        gen.ip("link", "set", "d1", "up")
        gen.ip("route", "add", "239.0.0.0/8", "dev", "g0")
        gen.ip("route", "add", "239.2.0.0/16", "dev", "d0")
        yield gen, sink


def _tool(ns: topology.Netns, *args: str) -> list[str]:
    return ns.cmd(sys.executable, "-m", "mcrelay", *args)


def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stderr], [], [], left)[0]:
            break
        line = proc.stderr.readline()
        if not line:  # EOF: the sink exited
            break
        if line.startswith("ready"):
            return
        seen.append(line)
    pytest.fail(f"sink not ready within {timeout} s (exit {proc.poll()}): {''.join(seen)}")


@contextlib.contextmanager
def running_sink(ns: topology.Netns, *args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        _tool(ns, "sink", "--json", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_ready(proc, timeout=5)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)


def _report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert out.count("\n") == 1, out  # exactly one JSON object
    report = json.loads(out)
    assert isinstance(report, dict)
    return report


def _gen(ns: topology.Netns, *args: str) -> str:
    result = subprocess.run(
        _tool(ns, "gen", "--count", "2000", "--rate", "20000", *args),
        capture_output=True,
        text=True,
        timeout=5,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("group", "port", "gen_args"),
    [
        pytest.param("239.1.1.1", 5001, [], id="multicast-by-route"),
        pytest.param("239.2.2.2", 5002, ["--interface", "g0"], id="multicast-by-interface"),
        pytest.param("239.2.2.2", 5003, ["--source", GEN_ADDR], id="multicast-by-source"),
        pytest.param(SINK_ADDR, 5004, [], id="unicast"),
    ],
)
def test_gen_to_sink_delivers_every_datagram_intact(pair, group, port, gen_args):
    gen, sink = pair
    sink_args = ["--group", group, "--port", str(port), "--interface", "s0"]
    with running_sink(sink, *sink_args, "--count", "2000", "--duration", "4") as proc:
        summary = _gen(gen, "--group", group, "--port", str(port), *gen_args)
        report = _report(proc)
    assert summary.startswith(f"sent 2000/2000 × 1024 B to {group}:{port}")
    assert report["stopped_by"] == "count"
    assert (report["received"], report["lost"], report["corrupted"]) == (2000, 0, 0)
    assert (report["duplicated"], report["bytes"]) == (0, 2000 * 1024)
    assert report["streams"] == {
        "0": {
            "received": 2000,
            "unique": 2000,
            "min_seq": 0,
            "max_seq": 1999,
            "expected": 2000,
            "lost": 0,
            "duplicated": 0,
            "reordered": 0,
        }
    }
    assert 0 <= report["latency_p50_us"] <= report["latency_max_us"] < 1_000_000
    assert 15_000 < report["pps"] < 25_000  # paced, not bursted
    assert 0 <= report["max_gap_us"] < 200_000  # no outage in a paced stream


def test_route_alone_does_not_reach_the_sink(pair):
    """The control for the --interface/--source cases: 239.2/16 normally goes to d0."""
    gen, sink = pair
    args = ["--group", "239.2.2.2", "--port", "5005", "--interface", "s0"]
    with running_sink(sink, *args, "--duration", "0.5") as proc:
        _gen(gen, "--group", "239.2.2.2", "--port", "5005")
        report = _report(proc)
    assert (report["stopped_by"], report["received"]) == ("duration", 0)


def test_sink_max_gap_spans_a_pause_between_two_streams(pair):
    """Two bursts with a pause of at least PAUSE between them (the gap's lower bound); the gap
    cannot exceed the time from the first burst's start to the second's end."""
    gen, sink = pair
    pause = 0.3
    args = ["--group", "239.1.1.1", "--port", "5007", "--interface", "s0"]
    with running_sink(sink, *args, "--count", "4000", "--duration", "6") as proc:
        t0 = time.monotonic()
        _gen(gen, "--group", "239.1.1.1", "--port", "5007")
        first_done = time.monotonic()
        time.sleep(pause)  # the pause is the stream's own clock: what max_gap_us must show
        second_start = time.monotonic()
        _gen(gen, "--group", "239.1.1.1", "--port", "5007", "--stream", "1")
        t1 = time.monotonic()
        report = _report(proc)
    assert (report["received"], report["lost"]) == (4000, 0)
    assert (second_start - first_done) * 1e6 <= report["max_gap_us"] <= (t1 - t0) * 1e6
    longest = max(report["gaps"], key=lambda g: g["gap_us"])
    assert longest["gap_us"] == report["max_gap_us"]
    assert (longest["before"], longest["after"], longest["missing"]) == ([0, 1999], [1, 0], None)


CRAFTED = """
import socket, sys
from mcrelay.cli.traffic import payload as p
bad = bytearray(p.build_payload(7, 1024))
bad[500] ^= 1
datagrams = [p.build_payload(s, 1024) for s in (0, 1, 3, 2, 2, 6)] + [bytes(bad), b"junk"]
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for d in datagrams:
        s.sendto(d, (sys.argv[1], int(sys.argv[2])))
"""


def test_sink_reports_loss_duplicates_reordering_and_corruption(pair):
    """Crafted datagrams in a known order, so every counter has an exact expected value."""
    gen, sink = pair
    args = ["--group", "239.1.1.1", "--port", "5006", "--interface", "s0"]
    with running_sink(sink, *args, "--idle-timeout", "0.3", "--duration", "4") as proc:
        gen.run(sys.executable, "-c", CRAFTED, "239.1.1.1", "5006", timeout=5)
        report = _report(proc)
    assert report["stopped_by"] == "idle"
    assert report["received"] == 8
    assert (report["expected"], report["lost"]) == (7, 2)  # seqs 0..6 without 4 and 5
    assert (report["duplicated"], report["reordered"]) == (1, 1)
    assert (report["corrupted"], report["malformed"]) == (2, 1)
