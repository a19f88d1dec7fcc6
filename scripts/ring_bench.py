#!/usr/bin/env python3
"""Measure the reference relay loop: capture + TPACKET_V3 ring + sendmmsg egress, one process.

    sudo /tmp/v/bin/python scripts/ring_bench.py --rates 100000,200000 --count 1000000

Topology `tests.netns.topology.chain()`: gen-ns ─veth─ relay-ns ─veth─ sink-ns.

- gen (gen-ns, pinned to --other-cpu): --payload-byte datagrams to 239.1.1.1 at a fixed rate
  (0: as fast as it can), sent with UDP GSO and cut into frames in software on its veth when
  pyroute2 is installed (cheap, so one shared CPU can offer enough load), else with sendmmsg;
- relay (relay-ns, pinned to --relay-cpu): `relay_forever` under trio, exactly as a worker runs
  it, relaying to 239.2.2.2 out of the second veth;
- sink (sink-ns, pinned to --other-cpu): counts the relayed datagrams on its own ring.

Relay modes (--modes): `plain` one message per datagram; `gso` UDP GSO, where veth hands whole
GSO packets to the sink (like a NIC with UDP segmentation offload); `gso-sw` UDP GSO with
segmentation offload turned off on the relay's veth, so the relay CPU also cuts the frames
(like a NIC without it; needs pyroute2).

Where the kernel work lands: veth delivery runs in the sender's context, so the relay
namespace's receive path (IP input + the copy into the relay's ring) is charged to the gen CPU,
and RPS on the sink veth moves the sink's receive path off the relay CPU. The relay CPU thus
carries the relay process and its transmit path, as it would with a NIC. "relay cpu" is the
relay process's user+sys time (precise in total; its user/sys split is tick-sampled and
unreliable in a VM) per relayed datagram; "idle" is the share of the run it spent waiting for
blocks. Caveat for small VMs: a guest whose vCPUs are all busy may be descheduled by its host
(here: each of 2 vCPUs loses ~1/3 of wall time in 4-12 ms gaps), which shows up as ring drops
at unpaced rates although the relay's CPU time per packet is unchanged.

Every role is bounded by count and time and exits by itself; the driver kills leftovers by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import select
import struct
import subprocess
import sys
import time
import types
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IN_GROUP, OUT_GROUP, PORT = "239.1.1.1", "239.2.2.2", 5001
MODES = ("plain", "gso", "gso-sw")


def emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def softnet_drops() -> list[int]:
    lines = Path("/proc/net/softnet_stat").read_text().splitlines()
    return [int(line.split()[1], 16) for line in lines]


def have_pyroute2() -> bool:
    try:
        import pyroute2.ethtool.ioctl  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- roles (inside a namespace)


def role_gen(a: argparse.Namespace) -> None:
    from mcrelay.dataplane.egress import IOVEC_TYPECODE, Destination, SendBatch, open_output_socket

    os.sched_setaffinity(0, {a.cpu})
    sock = open_output_socket(a.ifname, ttl=4, multicast=True)
    buf = ctypes.create_string_buffer((bytes(range(256)) * (a.payload // 256 + 1))[: a.payload])
    dest = Destination(IN_GROUP, PORT)
    burst = 1024 if a.rate == 0 else max(16, min(1024, a.rate // 2000))
    iovecs = array(IOVEC_TYPECODE, [ctypes.addressof(buf), a.payload] * burst)
    batch = SendBatch(burst)
    gso_max = a.payload if a.gen_gso else 0
    emit({"ready": True})
    offered = failed = 0
    t0 = time.perf_counter()
    limit = t0 + a.max_seconds
    while offered + failed < a.count and time.perf_counter() < limit:
        k = min(burst, a.count - offered - failed)
        batch.extend(dest, iovecs[: 2 * k], gso_max=gso_max)
        r = batch.flush(sock)
        offered += r.sent
        failed += r.failed
        if a.rate:
            delay = t0 + (offered + failed) / a.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    emit({"offered": offered, "gen_failed": failed, "elapsed": time.perf_counter() - t0})


def role_relay(a: argparse.Namespace) -> None:
    import trio

    from mcrelay.dataplane.capture import open_capture_socket
    from mcrelay.dataplane.egress import Destination, SendBatch, open_output_socket, udp_gso_max
    from mcrelay.dataplane.relay_loop import BlockCounts, Output, Route, relay_forever, route_key
    from mcrelay.dataplane.ring import RxRing

    os.sched_setaffinity(0, {a.cpu})
    ring = RxRing(open_capture_socket(a.ifname, fanout_group=None))
    out = open_output_socket(a.out_ifname, ttl=4, multicast=True)
    gso_max = udp_gso_max(a.out_ifname) if a.mode != "plain" else 0
    output = Output(out, Destination(OUT_GROUP, PORT), gso_max)
    routes = types.SimpleNamespace(table={route_key(IN_GROUP, PORT): Route((output,))})
    totals = [0] * len(BlockCounts._fields)
    seen = {"blocks": 0, "first": 0.0, "last": 0.0, "waited": 0.0}

    def on_block(c: BlockCounts) -> None:
        for i, v in enumerate(c):
            totals[i] += v
        seen["blocks"] += 1
        if c.matched:  # stray frames (IPv6 chatter) don't stretch the window
            seen["last"] = time.monotonic()
            seen["first"] = seen["first"] or seen["last"]

    real_wait = trio.lowlevel.wait_readable

    async def timed_wait(fd: Any) -> None:
        t = time.monotonic()
        await real_wait(fd)
        if seen["first"]:
            seen["waited"] += time.monotonic() - t

    trio.lowlevel.wait_readable = timed_wait  # relay_forever looks it up at each call

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                relay_forever, ring, routes, SendBatch(a.batch), lambda f, v: None, on_block
            )
            limit = time.monotonic() + a.max_seconds
            while time.monotonic() < limit:
                await trio.sleep(0.1)
                if seen["last"] and time.monotonic() - seen["last"] > a.idle:
                    break
            nursery.cancel_scope.cancel()

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    emit({"ready": True})
    trio.run(main)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    stats = ring.stats()
    emit(
        {
            **dict(zip(BlockCounts._fields, totals, strict=True)),
            "blocks": seen["blocks"],
            "active": seen["last"] - seen["first"],
            "waited": seen["waited"],
            "utime": ru1.ru_utime - ru0.ru_utime,
            "stime": ru1.ru_stime - ru0.ru_stime,
            "ring_drops": stats.drops,
            "ring_freezes": stats.freezes,
            "gso_max": output.gso_max,
            "last_error": output.last_error,
        }
    )
    ring.close()


def role_sink(a: argparse.Namespace) -> None:
    from mcrelay.dataplane.capture import open_capture_socket
    from mcrelay.dataplane.ring import RxRing

    os.sched_setaffinity(0, {a.cpu})
    ring = RxRing(open_capture_socket(a.ifname, fanout_group=None))
    # next_offset, snaplen, len, tp_mac. A GSO packet (veth passes them through whole) holds
    # several datagrams of --payload bytes: count them by length.
    header = struct.Struct("<I8xII4xH").unpack_from
    dport = struct.Struct("!H").unpack_from
    buf = ring.buffer
    count = 0
    last = 0.0
    emit({"ready": True})
    limit = time.monotonic() + a.max_seconds
    while (now := time.monotonic()) < limit and not (count and now - last > a.idle):
        block = ring.next_block()
        if block is None:
            select.select([ring], [], [], 0.1)
            continue
        off = block.first
        for _ in range(block.count):
            nxt, snap, wire, mac = header(buf, off)
            if snap >= 42 and dport(buf, off + mac + 36)[0] == PORT:
                count += max(1, (wire - 42) // a.payload)
            off += nxt
        block.release()
        last = time.monotonic()
    emit({"received": count, "sink_drops": ring.stats().drops})
    ring.close()


def role_no_uso(a: argparse.Namespace) -> None:
    """Turn off UDP segmentation offload on a veth, so GSO packets are cut in software."""
    from pyroute2.ethtool.ioctl import IoctlEthtool

    ethtool = IoctlEthtool(a.ifname)
    features = ethtool.get_features()
    features["tx-udp-segmentation"] = False
    ethtool.set_features(features)
    if ethtool.get_features()["tx-udp-segmentation"]:
        raise SystemExit(f"could not turn off tx-udp-segmentation on {a.ifname}")


# ---------------------------------------------------------------- driver (root namespace)


@contextlib.contextmanager
def spawn(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
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
    raise TimeoutError(f"no result from {proc.args!r}")


def run_once(a: argparse.Namespace, rate: int, mode: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.netns.topology import chain

    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--count", str(a.count), "--payload", str(a.payload), "--idle", str(a.idle)]
    common += ["--max-seconds", str(a.max_seconds)]
    with chain() as c:
        for ns in (c.gen, c.relay, c.sink):  # no IPv6 chatter in the counts
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        # The sink's receive path runs on the other CPU, not in the relay's sendmmsg.
        mask = format(1 << a.other_cpu, "x")
        c.sink.run("sh", "-c", f"echo {mask} > /sys/class/net/{c.sink_if}/queues/rx-0/rps_cpus")
        if a.gen_gso:
            c.gen.run(*me, "--role", "no-uso", "--ifname", c.gen_if)
        if mode == "gso-sw":
            c.relay.run(*me, "--role", "no-uso", "--ifname", c.relay_out)
        sink_argv = c.sink.cmd(*me, "--role", "sink", "--ifname", c.sink_if)
        sink_argv += ["--cpu", str(a.other_cpu)]
        relay_argv = c.relay.cmd(*me, "--role", "relay", "--ifname", c.relay_in, "--mode", mode)
        relay_argv += ["--out-ifname", c.relay_out, "--batch", str(a.batch)]
        relay_argv += ["--cpu", str(a.relay_cpu)]
        gen_argv = c.gen.cmd(*me, "--role", "gen", "--ifname", c.gen_if, "--rate", str(rate))
        gen_argv += ["--cpu", str(a.other_cpu), "--gen-gso" if a.gen_gso else "--no-gen-gso"]
        drops0 = softnet_drops()
        with spawn(sink_argv + common) as sink, spawn(relay_argv + common) as relay:
            read_json(sink, 20)
            read_json(relay, 20)
            with spawn(gen_argv + common) as gen:
                read_json(gen, 20)
                g = read_json(gen, a.max_seconds + 10)
            r = read_json(relay, a.max_seconds + 10)
            s = read_json(sink, a.max_seconds + 10)
        drops = [d1 - d0 for d0, d1 in zip(drops0, softnet_drops(), strict=True)]
    return {"rate": rate, "mode": mode, **g, **r, **s, "softnet_drops": drops}


def report(res: dict[str, Any]) -> str:
    offered, got, sent = res["offered"], res["received"], max(res["sent"], 1)
    cpu = res["utime"] + res["stime"]
    active = max(res["active"], 1e-9)
    return (
        f"{res['mode']:>6} @ {res['rate'] or 'unpaced':>7}:"
        f" offered {offered / res['elapsed']:8,.0f} pps"
        f"  relayed {res['sent'] / active:8,.0f} pps"
        f"  loss {offered - got:,} ({(offered - got) / max(offered, 1):.2%})"
        f"  relay cpu {cpu * 1e6 / sent:.2f} µs/pkt  idle {res['waited'] / active:.0%}"
        f"  | ring drops {res['ring_drops']} freezes {res['ring_freezes']}"
        f" send errors {res['send_errors']} sink drops {res['sink_drops']}"
        f" softnet drops {res['softnet_drops']} blocks {res['blocks']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rates", default="100000,200000", help="pps per run, 0 = unpaced")
    default_modes = "plain,gso-sw" if have_pyroute2() else "plain,gso"
    p.add_argument("--modes", default=default_modes, help=f"any of {', '.join(MODES)}")
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--payload", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1024, help="relay SendBatch capacity")
    p.add_argument("--idle", type=float, default=1.0, help="seconds without traffic ending a role")
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--relay-cpu", type=int, default=1)
    p.add_argument("--other-cpu", type=int, default=0)
    p.add_argument("--gen-gso", action=argparse.BooleanOptionalAction, default=have_pyroute2())
    p.add_argument("--json", action="store_true", help="also print raw results")
    # Internal: one role of the topology, run inside its namespace.
    p.add_argument("--role", choices=("gen", "relay", "sink", "no-uso"), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, default="plain", help=argparse.SUPPRESS)
    p.add_argument("--ifname", help=argparse.SUPPRESS)
    p.add_argument("--out-ifname", help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role:
        roles = {"gen": role_gen, "relay": role_relay, "sink": role_sink, "no-uso": role_no_uso}
        roles[a.role](a)
        return
    for rate in map(int, a.rates.split(",")):
        for mode in a.modes.split(","):
            if mode not in MODES:
                p.error(f"unknown mode {mode!r}")
            res = run_once(a, rate, mode)
            if a.json:
                print(json.dumps(res))
            print(report(res), flush=True)


if __name__ == "__main__":
    main()
