"""Traffic roles of scripts/bench, each run inside a network namespace by the driver.

    ip netns exec NS python -m tests.lab.bench.traffic gen  --ifname IF --group G --port P ...
    ip netns exec NS python -m tests.lab.bench.traffic sink --ifname IF --flows F ...

Both print JSON lines on stdout: ``{"ready": true}`` once set up, then one result object.

gen — the fast generator (absorbed from the earlier ring benchmark). It sends the
payload format of `mcrelay gen`/`mcrelay sink` (magic, stream, seq, CLOCK_REALTIME send time,
filler) so either sink can check it, but hands the kernel up to 63 datagrams per UDP GSO
message (`mcrelay.dataplane.egress.SendBatch`). The driver turns tx-udp-segmentation off on the
generator's veth, so the kernel cuts the GSO messages into ordinary frames in software at the
device: receivers see normal datagrams, one per frame. Headers are written in place into a
prebuilt buffer of 4096 payloads (the filler of `seq` depends only on ``seq mod 4096`` and the
stream), so the per-datagram Python work is one ``pack_into``. F flows (F sockets, F source
ports, stream ids base..base+F-1) take turns per send; PACKET_FANOUT_HASH spreads flows, not
packets, over mcrelay's workers. Pacing follows an absolute schedule (datagram i is due at
t0 + i/rate) in bursts of about 100 µs; a send the socket cannot take now (EAGAIN, ENOBUFS) is
retried, so every datagram counted as sent was handed to the device.

sink — a counting sink on a TPACKET_V3 ring (no UDP socket, no copy to user space): it reads
the destination, stream, seq and send time of every frame in place, so it keeps up with far
more than `mcrelay sink`. Per (destination address, stream) it keeps a seq bitmap: unique,
duplicated, reordered (a new seq below the highest seen). Latency is the kernel's receive
timestamp of the frame (tp_sec/tp_nsec, CLOCK_REALTIME, taken when the frame reached the
sink's interface) minus the send time in the payload, sampled on every 4th seq. It stops when
it has seen --expect datagrams, --idle seconds after the last one once the driver wrote a line
on stdin (the generator is done), or after --max-seconds.
Frames its ring had to drop are reported (`ring_drops`): a run with sink drops measured the
sink, not the relay.

Safety: gen refuses to run outside a namespace the benchmark made (`mcr-*`) and to send anywhere but
239.0.0.0/8; every role is bounded by count and time."""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from array import array
from pathlib import Path
from typing import Any

from mcrelay.cli.traffic import payload

PR_SET_TIMERSLACK = 29
MAX_GSO_SEGMENTS = 63  # 63 × 1024 B fits one UDP datagram (65507 B)
SLOTS = 4096  # payload.filler_offset(seq, stream) depends on seq mod 4096 only


def emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def pin(cpus: str | None) -> None:
    """Run on these CPUs ("0" or "0,1"); the parent's affinity is not inherited then."""
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def in_bench_netns() -> bool:
    """True inside a namespace made by tests/lab/topology.py (`ip netns add mcr-…`)."""
    me = os.stat("/proc/self/ns/net")
    run = Path("/run/netns")
    named = run.glob("mcr-*") if run.is_dir() else ()
    return any((st := f.stat()).st_ino == me.st_ino and st.st_dev == me.st_dev for f in named)


# ---------------------------------------------------------------- gen


def role_gen(a: argparse.Namespace) -> None:
    from mcrelay.dataplane.egress import IOVEC_TYPECODE, Destination, SendBatch, open_output_socket

    if not in_bench_netns():
        raise SystemExit("bench traffic gen: only runs inside a benchmark namespace (mcr-*)")
    if ipaddress.IPv4Address(a.group) not in ipaddress.IPv4Network("239.0.0.0/8"):
        raise SystemExit("bench traffic gen: only 239.0.0.0/8 groups")
    pin(a.cpu)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)  # sleeps of ~100 µs wake on time
    size = payload.check_size(a.size)
    socks = [open_output_socket(a.ifname, ttl=a.ttl, multicast=True) for _ in range(a.flows)]
    for s in socks:
        s.bind(("0.0.0.0", 0))  # a source port per flow: the fanout hash tells them apart
    dest = Destination(a.group, a.port)
    streams = [a.stream_base + f for f in range(a.flows)]
    # One buffer of SLOTS payloads; slot k holds the filler that starts at PATTERN[k].
    buf = ctypes.create_string_buffer(SLOTS * size)
    mv = memoryview(buf).cast("B")
    for k in range(SLOTS):
        mv[k * size + payload.HEADER_SIZE : (k + 1) * size] = payload.PATTERN[
            k : k + size - payload.HEADER_SIZE
        ]
    base = ctypes.addressof(buf)
    pack = payload.HEADER.pack_into
    magic = payload.MAGIC
    gso_max = size if a.gso else 0
    max_burst = 4 * MAX_GSO_SEGMENTS if a.gso else 64
    # paced: a send every ~100 µs; unpaced: four full GSO messages per sendmmsg
    burst = int(min(max_burst, max(1, a.rate / 10_000))) if a.rate else max_burst
    batch = SendBatch(max_burst)
    seqs = [0] * a.flows
    count = a.count
    sent = retries = 0
    flow = 0
    emit({"ready": True})
    t0 = time.perf_counter()
    first_at = last_at = 0.0
    limit = t0 + a.max_seconds
    rate = float(a.rate)
    while sent < count:
        now = time.perf_counter()
        if now > limit:
            break
        k = min(burst, count - sent)
        if rate:
            due = int((now - t0) * rate) + 1
            if due < sent + k and due < count:
                time.sleep((sent + k - due) / rate)
                continue
            k = min(max(k, due - sent), max_burst, count - sent)
        sid = streams[flow]
        seq = seqs[flow]
        ts = time.clock_gettime_ns(time.CLOCK_REALTIME)
        iov = array(IOVEC_TYPECODE, bytes(16 * k))
        for i in range(k):
            n = seq + i
            off = ((n * 0x9E3779B1 + sid * 0x85EBCA77) % SLOTS) * size
            pack(buf, off, magic, sid, n, ts)
            iov[2 * i] = base + off
            iov[2 * i + 1] = size
        batch.extend(dest, iov, gso_max=gso_max)
        res = batch.flush(socks[flow])
        went = res.sent  # failures are the tail of the batch; they are sent again below
        if went:
            if not first_at:
                first_at = now
            last_at = time.perf_counter()
            seqs[flow] += went
            sent += went
            flow = (flow + 1) % a.flows
        if res.failed:
            if res.error not in (errno.EAGAIN, errno.ENOBUFS, errno.EINTR):
                raise SystemExit(f"bench traffic gen: send failed: {os.strerror(res.error)}")
            retries += 1
            select.select([], [socks[flow]], [], 0.001)
    elapsed = time.perf_counter() - t0
    span = last_at - first_at
    emit(
        {
            "sent": sent,
            "per_stream": dict(zip(map(str, streams), seqs, strict=True)),
            "elapsed_s": round(elapsed, 6),
            "pps": round(sent / span, 1) if span > 0 else 0.0,
            "retries": retries,
            "gso": bool(gso_max),
            "timed_out": sent < count,
            "cpu_s": round(cpu_s(), 3),
        }
    )


# ---------------------------------------------------------------- sink

# tpacket3_hdr: next_offset, sec, nsec, snaplen, len, status, mac
_HDR = struct.Struct("<IIIIIIH").unpack_from
# From the MAC header: ethertype, IP protocol, IP destination, UDP dport, magic, stream, seq, ts
_PKT = struct.Struct("!12xH9xB6xI2xH4x4sIQQ").unpack_from
_PKT_LEN = 66


class _Stream:
    __slots__ = ("bits", "dup", "max_seq", "reord", "unique")

    def __init__(self, n: int) -> None:
        self.bits = bytearray(n // 8 + 1)
        self.unique = self.dup = self.reord = 0
        self.max_seq = -1


def role_sink(a: argparse.Namespace) -> None:
    import msgspec

    from mcrelay.dataplane.capture import CAPTURE_RING, open_capture_socket
    from mcrelay.dataplane.ring import RxRing

    pin(a.cpu)
    spec = msgspec.structs.replace(CAPTURE_RING, block_count=128)
    ring = RxRing(open_capture_socket(a.ifname, spec, fanout_group=None), spec)
    buf = ring.buffer
    lo, hi = a.stream_base, a.stream_base + a.flows
    nbits = a.max_seq + 1
    streams: dict[tuple[int, int], _Stream] = {}
    lat = array("q")
    other = 0
    total = 0
    first_ns = last_ns = 0
    emit({"ready": True})
    cpu0 = cpu_s()
    deadline = time.monotonic() + a.max_seconds
    last_seen = done_at = 0.0
    expect = a.expect or 0
    stdin = sys.stdin
    while True:
        now = time.monotonic()
        if now > deadline or (expect and total >= expect):
            break
        if done_at and now - max(last_seen, done_at) > a.idle:
            break
        block = ring.next_block()
        if block is None:
            ready = select.select([ring, stdin] if not done_at else [ring], [], [], 0.05)[0]
            if stdin in ready:  # the driver says the generator is done (or went away)
                stdin.readline()
                done_at = time.monotonic()
            continue
        off = block.first
        got = 0
        for _ in range(block.count):
            nxt, sec, nsec, snap, _wire, _status, mac = _HDR(buf, off)
            if snap >= _PKT_LEN:
                etype, proto, dst, _dport, mg, sid, seq, ts = _PKT(buf, off + mac)
                if etype == 0x0800 and proto == 17 and mg == b"MCRL" and lo <= sid < hi:
                    st = streams.get((dst, sid))
                    if st is None:
                        st = streams[dst, sid] = _Stream(nbits)
                    if seq < nbits:
                        j, m = seq >> 3, 1 << (seq & 7)
                        b = st.bits[j]
                        if b & m:
                            st.dup += 1
                        else:
                            st.bits[j] = b | m
                            st.unique += 1
                            if seq > st.max_seq:
                                st.max_seq = seq
                            else:
                                st.reord += 1
                            if not seq & 3:
                                lat.append(sec * 1_000_000_000 + nsec - ts)
                    got += 1
                    last_ns = sec * 1_000_000_000 + nsec
                    if not first_ns:
                        first_ns = last_ns
                else:
                    other += 1
            else:
                other += 1
            off += nxt
        block.release()
        if got:
            total += got
            last_seen = time.monotonic()
    drops = ring.stats().drops
    ring.close()
    lat = array("q", sorted(lat))

    def pct(p: float) -> float | None:
        if not lat:
            return None
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] / 1000, 1)

    by_dest: dict[str, dict[str, Any]] = {}
    for (dst, sid), st in sorted(streams.items()):
        d = by_dest.setdefault(
            str(ipaddress.IPv4Address(dst)), {"unique": 0, "dup": 0, "reord": 0, "streams": {}}
        )
        d["unique"] += st.unique
        d["dup"] += st.dup
        d["reord"] += st.reord
        d["streams"][str(sid)] = st.unique
    span = (last_ns - first_ns) / 1e9
    unique = sum(d["unique"] for d in by_dest.values())
    emit(
        {
            "frames": total,
            "unique": unique,
            "dup": sum(d["dup"] for d in by_dest.values()),
            "reord": sum(d["reord"] for d in by_dest.values()),
            "by_dest": by_dest,
            "other_frames": other,
            "active_s": round(span, 6),
            "pps": round(unique / span, 1) if span > 0 else 0.0,
            "lat_p50_us": pct(0.5),
            "lat_p99_us": pct(0.99),
            "lat_max_us": round(lat[-1] / 1000, 1) if lat else None,
            "ring_drops": drops,
            "cpu_s": round(cpu_s() - cpu0, 3),
        }
    )


# ---------------------------------------------------------------- hold (input-path cost)


def role_hold(a: argparse.Namespace) -> None:
    """Stand in the relay namespace doing only part of a relay's input work, until stdin closes.

    join: a socket joined to the group with a 1-byte receive buffer and a drop-all filter, as
    mcrelay's supervisor holds for IGMP: the IP stack delivers every datagram to it, in vain.
    ring: that, plus an AF_PACKET TPACKET_V3 ring whose blocks are handed back unread.
    """
    from mcrelay.dataplane import bpf
    from mcrelay.dataplane.capture import CAPTURE_RING, open_capture_socket
    from mcrelay.dataplane.ring import RxRing
    from mcrelay.system.linux import ip_mreqn

    pin(a.cpu)
    keep: list[Any] = []
    if a.mode in ("join", "ring"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        bpf.attach(s, bpf.drop_all())
        mreqn = ip_mreqn(a.group, index=socket.if_nametoindex(a.ifname))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        keep.append(s)
    ring = None
    if a.mode == "ring":
        ring = RxRing(open_capture_socket(a.ifname, CAPTURE_RING, fanout_group=None), CAPTURE_RING)
    emit({"ready": True})
    while True:
        r = select.select([sys.stdin] + ([ring] if ring else []), [], [], 1.0)[0]
        if sys.stdin in r and not sys.stdin.readline():
            break
        while ring is not None and (block := ring.next_block()) is not None:
            block.release()
    if ring is not None:
        ring.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="role", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--ifname", required=True)
    g.add_argument("--group", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--rate", type=int, default=0, help="datagrams/s, 0 = unpaced")
    g.add_argument("--count", type=int, required=True)
    g.add_argument("--size", type=int, default=1024)
    g.add_argument("--flows", type=int, default=1)
    g.add_argument("--stream-base", type=int, default=0)
    g.add_argument("--ttl", type=int, default=8)
    g.add_argument("--gso", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--cpu", help="CPU list, e.g. 0 or 0,1")
    g.add_argument("--max-seconds", type=float, default=60.0)
    s = sub.add_parser("sink")
    s.add_argument("--ifname", required=True)
    s.add_argument("--flows", type=int, default=1)
    s.add_argument("--stream-base", type=int, default=0)
    s.add_argument("--max-seq", type=int, required=True, help="largest seq a stream can have")
    s.add_argument("--expect", type=int, default=0, help="stop after this many datagrams")
    s.add_argument("--idle", type=float, default=0.5)
    s.add_argument("--cpu", help="CPU list, e.g. 0 or 0,1")
    s.add_argument("--max-seconds", type=float, default=60.0)
    h = sub.add_parser("hold")
    h.add_argument("--ifname", required=True)
    h.add_argument("--group", required=True)
    h.add_argument("--mode", choices=("none", "join", "ring"), required=True)
    h.add_argument("--cpu", help="CPU list")
    a = p.parse_args()
    {"gen": role_gen, "sink": role_sink, "hold": role_hold}[a.role](a)


if __name__ == "__main__":
    main()
