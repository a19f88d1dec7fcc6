"""Capture socket + TPACKET_V3 ring + sendmmsg egress, with real frames between namespaces.

Sockets are made where they belong: a short-lived helper runs `open_capture_socket` /
`open_output_socket` inside the namespace and passes the descriptors back over SCM_RIGHTS, as
the supervisor does for workers; rings, relaying and receiving then run in this process. A
datagram's payload is a pure function of its sequence number, so every delivery is checked
byte for byte. Senders are `python -c` subprocesses, bounded by count and a timeout, killed by
PID and reaped in `finally`; every wait polls a descriptor under a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import select
import socket
import struct
import subprocess
import sys
import types
from array import array
from collections.abc import Callable, Iterator
from time import monotonic

import msgspec
import pytest
import trio

from mcrelay.dataplane.capture import CAPTURE_RING, open_capture_socket
from mcrelay.dataplane.egress import IOVEC_TYPECODE, Destination, SendBatch
from mcrelay.dataplane.relay_loop import (
    BlockCounts,
    Output,
    Route,
    relay_block,
    relay_forever,
    route_key,
)
from mcrelay.dataplane.ring import RxRing
from mcrelay.ipc.messages import CaptureSpec
from tests.lab import topology
from tests.lab.processes import wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
]

N = 5000
GROUP, PORT = "239.7.7.7", 4007
OUT_GROUP, OUT_PORT = "239.8.8.8", 4008
DEADLINE = 8.0

_PAYLOAD = """
PATTERN = bytes(range(256)) * 6
def payload(seq, size=0):
    # By default 0..1468 bytes: empty, padded-frame and (with IP options) full-MTU frames.
    size = size or seq * 37 % 1469
    return (seq.to_bytes(4, "big") + PATTERN[seq % 251:])[:size] if size >= 4 else bytes(size)
"""
_ns: dict[str, Callable[[int, int], bytes]] = {}
exec(_PAYLOAD, _ns)
payload = _ns["payload"]

# argv: group port count flows options_every size. Flow f sends from its own socket (source
# port); every options_every-th datagram goes out of a socket with IP options (IHL 6: slow path).
_SENDER = (
    _PAYLOAD
    + """
import socket, sys, time
group, port, count, flows, every, size = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:7])
def sock(options):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 4)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    if options:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([1, 1, 1, 0]))
    return s
plain = [sock(False) for _ in range(flows)]
optioned = sock(True)
for seq in range(count):
    s = optioned if every and seq % every == every - 1 else plain[seq % flows]
    s.sendto(payload(seq, size), (group, port))
    if seq % 200 == 199:
        time.sleep(0.002)
"""
)

# Holds all N datagrams of a test (8 MiB), so a reader starved by a loaded machine loses none.
SMALL_RING = msgspec.structs.replace(CAPTURE_RING, block_size=1 << 16, block_count=128)
TINY_RING = msgspec.structs.replace(SMALL_RING, block_count=4)

# argv: channel fd, JSON list of specs. Sends back one descriptor per spec.
_HELPER = """
import json, socket, sys
from mcrelay.dataplane.capture import open_capture_socket
from mcrelay.dataplane.egress import open_output_socket
from mcrelay.ipc.messages import CaptureSpec
from mcrelay.system.linux import SO_RCVBUFFORCE, ip_mreqn
chan = socket.socket(fileno=int(sys.argv[1]))
socks = []
for kind, *args in json.loads(sys.argv[2]):
    if kind == "capture":
        ring = CaptureSpec(**args[2])
        socks.append(open_capture_socket(args[0], ring, fanout_group=args[1]))
    elif kind == "output":
        socks.append(open_output_socket(args[0], ttl=4, multicast=args[1]))
    elif kind == "receiver":
        group, port, ifname = args
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        s.bind((group, port))
        if ifname:
            mreqn = ip_mreqn(group, index=socket.if_nametoindex(ifname))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        s.setblocking(False)
        socks.append(s)
socket.send_fds(chan, [b"ok"], [s.fileno() for s in socks])
"""


def capture(
    ifname: str, fanout_group: int | None, ring: CaptureSpec = CAPTURE_RING
) -> list[object]:
    """A helper spec for a capture socket with the ring `ring` (map it with the same spec)."""
    return ["capture", ifname, fanout_group, msgspec.to_builtins(ring)]


def ns_sockets(
    stack: contextlib.ExitStack, ns: topology.Netns, *specs: list[object]
) -> list[socket.socket]:
    """Sockets created inside `ns` by the helper, received here by SCM_RIGHTS; `stack`
    closes them."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        argv = ns.cmd(sys.executable, "-c", _HELPER, str(theirs.fileno()), json.dumps(specs))
        subprocess.run(argv, pass_fds=(theirs.fileno(),), check=True, timeout=10)
        ours.settimeout(5)
        msg, fds, flags, _ = socket.recv_fds(ours, 16, len(specs))
    socks = [stack.enter_context(socket.socket(fileno=fd)) for fd in fds]
    assert msg == b"ok"
    assert not flags & socket.MSG_CTRUNC
    assert len(socks) == len(specs)
    return socks


@contextlib.contextmanager
def sender(
    ns: topology.Netns, *, flows: int = 1, options_every: int = 0, size: int = 0
) -> Iterator[subprocess.Popen[bytes]]:
    argv = [GROUP, str(PORT), str(N), str(flows), str(options_every), str(size)]
    proc = subprocess.Popen(ns.cmd(sys.executable, "-c", _SENDER, *argv))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def udp_of(frame: bytes) -> tuple[int, int, int, bytes] | None:
    """(source port, destination port, IHL, payload) of a UDP-in-IPv4 frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ip = 14
    hlen = (frame[ip] & 0x0F) * 4
    sport, dport, ulen = struct.unpack_from("!HHH", frame, ip + hlen)
    return sport, dport, hlen, frame[ip + hlen + 8 : ip + hlen + ulen]


def seq_of(data: bytes, size: int = 0) -> int:
    """The sequence number a payload was made from (payloads under 4 bytes carry none)."""
    assert len(data) >= 4
    seq = int.from_bytes(data[:4], "big")
    assert data == payload(seq, size)
    return seq


def collect(rings: list[RxRing], want: int) -> list[list[tuple[int, bytes]]]:
    """Per ring, the (source port, payload) of every datagram to PORT, until `want` in all."""
    got: list[list[tuple[int, bytes]]] = [[] for _ in rings]
    deadline = monotonic() + DEADLINE
    while sum(map(len, got)) < want and (left := deadline - monotonic()) > 0:
        progress = False
        for ring, seen in zip(rings, got, strict=True):
            block = ring.next_block()
            if block is None:
                continue
            progress = True
            try:
                for f in block.frames():
                    udp = udp_of(ring.buffer[f.mac : f.mac + f.snaplen])
                    if udp and udp[1] == PORT:
                        assert f.snaplen == f.length
                        seen.append((udp[0], udp[3]))
            finally:
                block.release()
        if not progress:
            select.select(rings, [], [], min(left, 0.5))
    return got


def sizes_ok(payloads: list[bytes], size: int = 0) -> None:
    """Every sequence number exactly once; payloads too short to carry one counted by size."""
    seqs = sorted(seq_of(p, size) for p in payloads if len(p) >= 4)
    short = sum(1 for p in payloads if len(p) < 4)
    assert short == sum(1 for s in range(N) if len(payload(s, size)) < 4)
    assert seqs == [s for s in range(N) if len(payload(s, size)) >= 4]


@pytest.fixture
def closing() -> Iterator[contextlib.ExitStack]:
    """Closes every socket and ring a test opened, whatever happens."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def pair() -> Iterator[tuple[topology.Netns, topology.Netns]]:
    with topology.namespaces("tx", "rx") as ns:
        tx, rx = ns["tx"], ns["rx"]
        topology.veth(tx, "tx0", "10.200.5.1/24", rx, "rx0", "10.200.5.2/24")
        tx.ip("route", "add", "239.0.0.0/8", "dev", "tx0")
        yield tx, rx


Pair = tuple[topology.Netns, topology.Netns]


def test_ring_delivers_every_datagram(pair: Pair, closing: contextlib.ExitStack) -> None:
    tx, rx = pair
    (cap,) = ns_sockets(closing, rx, capture("rx0", None, SMALL_RING))
    ring = closing.enter_context(RxRing(cap, SMALL_RING))
    with sender(tx) as proc:
        (got,) = collect([ring], N)
        assert proc.wait(timeout=DEADLINE) == 0
    stats = ring.stats()
    sizes_ok([p for _, p in got])
    assert stats.packets >= N
    assert stats.drops == 0


def test_fanout_shares_flows_and_loses_none(pair: Pair, closing: contextlib.ExitStack) -> None:
    tx, rx = pair
    caps = ns_sockets(closing, rx, capture("rx0", 7, SMALL_RING), capture("rx0", 7, SMALL_RING))
    rings = [closing.enter_context(RxRing(c, SMALL_RING)) for c in caps]
    with sender(tx, flows=16) as proc:
        got = collect(rings, N)
        assert proc.wait(timeout=DEADLINE) == 0
    assert all(got), [len(g) for g in got]  # both members got a share
    ports = [{sport for sport, _ in g} for g in got]
    assert len(ports[0] | ports[1]) == 16
    assert not ports[0] & ports[1]  # a flow stays on one member
    sizes_ok([p for g in got for _, p in g])


def test_own_output_is_not_captured(pair: Pair, closing: contextlib.ExitStack) -> None:
    """Sender-side captures (alone and in a fanout group) never see the host's own frames."""
    tx, _ = pair
    caps = ns_sockets(closing, tx, capture("tx0", None, TINY_RING), capture("tx0", 9, TINY_RING))
    rings = [closing.enter_context(RxRing(c, TINY_RING)) for c in caps]
    with sender(tx) as proc:
        assert proc.wait(timeout=DEADLINE) == 0
    # The last datagram has left; any captured copy would be in a block within 2 ms.
    select.select(rings, [], [], 0.1)
    for ring in rings:
        while (block := ring.next_block()) is not None:
            assert not [f for f in block.frames() if f.pkttype == socket.PACKET_OUTGOING]
            block.release()


class _LinkWatch(RxRing):
    """A ring that notes each ENETDOWN the socket reports (`relay_forever` takes it and goes
    on), so a test sees when the link went down."""

    def __init__(self, sock: socket.socket, spec: CaptureSpec) -> None:
        super().__init__(sock, spec)
        self.downs: list[float] = []

    def error(self) -> int:
        err = super().error()
        if err == errno.ENETDOWN:
            self.downs.append(trio.current_time())
        return err


async def test_relaying_survives_a_link_flap(pair: Pair, closing: contextlib.ExitStack) -> None:
    """Link down: ENETDOWN is reported once and relaying goes on; link up: frames flow again."""
    tx, rx = pair
    (cap,) = ns_sockets(closing, rx, capture("rx0", None))
    ring = closing.enter_context(_LinkWatch(cap, CAPTURE_RING))
    route = Route(())
    routes = types.SimpleNamespace(table={route_key(GROUP, PORT): route})
    downs = ring.downs
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    relay_forever, ring, routes, SendBatch(), _ip_options_slow_path,
                    lambda counts: None,
                )
            )  # fmt: skip
            await trio.run_process(rx.cmd("ip", "link", "set", "rx0", "down"))
            while not downs:
                await trio.sleep(0.01)
            await trio.run_process(rx.cmd("ip", "link", "set", "rx0", "up"))
            argv = [GROUP, str(PORT), str(N), "1", "0", "0"]
            await trio.run_process(tx.cmd(sys.executable, "-c", _SENDER, *argv))
            while route.packets < N:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert len(downs) == 1
    assert route.packets == N


def _ip_options_slow_path(frame: bytes, vlan: int | None) -> tuple[int, int, int, int] | None:
    """A stand-in for the parser: whole untagged UDP/IPv4 datagrams with any IHL."""
    udp = udp_of(frame)
    if vlan is not None or udp is None or int.from_bytes(frame[20:22], "big") & 0x3FFF:
        return None
    _, dport, hlen, data = udp
    dst = socket.inet_ntoa(frame[30:34])
    return route_key(dst, dport), 14 + hlen + 8, len(data), int.from_bytes(frame[26:30], "big")


def test_source_switch(pair: Pair, closing: contextlib.ExitStack) -> None:
    """Rules differing in input source: the sender's own rule wins, else the sourceless one."""
    tx, rx = pair
    key, sender_ip, other_ip = route_key(GROUP, PORT), 0x0AC80501, 0x0AC80599  # 10.200.5.1/.99
    own, other, anyone = Route((), source=sender_ip), Route((), source=other_ip), Route(())
    tables = {
        "own": {key: Route.switch([other, own, anyone])},
        "anyone": {key: Route.switch([other, anyone])},
        "filtered": {key: Route.switch([other])},
    }
    filtered = 0
    (cap,) = ns_sockets(closing, rx, capture("rx0", None))
    ring = closing.enter_context(RxRing(cap, CAPTURE_RING))
    with sender(tx, options_every=5) as proc:  # slow path included
        deadline = monotonic() + DEADLINE
        while own.packets < N and (left := deadline - monotonic()) > 0:
            block = ring.next_block()
            if block is None:
                select.select([ring], [], [], min(left, 0.5))
                continue
            try:
                for name, table in tables.items():
                    counts = relay_block(block, table, SendBatch(), _ip_options_slow_path)
                    filtered += counts.filtered if name == "filtered" else 0
            finally:
                block.release()
        assert proc.wait(timeout=DEADLINE) == 0
    assert (own.packets, anyone.packets, other.packets, filtered) == (N, N, 0, N)


@pytest.mark.parametrize(
    ("size", "gso"),
    [(0, False), (0, True), (1000, True)],
    ids=["mixed-sizes", "mixed-sizes-gso", "equal-sizes-gso"],
)
def test_relay_forwards_byte_identical(size: int, gso: bool, closing: contextlib.ExitStack) -> None:
    """Every datagram arrives once and intact, whether or not GSO merges them on the way."""
    with topology.chain() as c:
        specs = capture(c.relay_in, None), ["output", c.relay_out, True]
        cap, out = ns_sockets(closing, c.relay, *specs)
        (rx,) = ns_sockets(closing, c.sink, ["receiver", OUT_GROUP, OUT_PORT, c.sink_if])
        ring = closing.enter_context(RxRing(cap, CAPTURE_RING))
        output = Output(out, Destination(OUT_GROUP, OUT_PORT), gso_max=1472 if gso else 0)
        route = Route((output,))
        table = {route_key(GROUP, PORT): route}
        batch = SendBatch(capacity=256)  # small, so big blocks take several flushes
        totals = BlockCounts(*[0] * len(BlockCounts._fields))
        received: list[bytes] = []
        with sender(c.gen, options_every=5, size=size) as proc:
            deadline = monotonic() + DEADLINE
            while len(received) < N and (left := deadline - monotonic()) > 0:
                block = ring.next_block()
                if block is not None:
                    try:
                        counts = relay_block(block, table, batch, _ip_options_slow_path)
                    finally:
                        block.release()
                    totals = BlockCounts(*(a + b for a, b in zip(totals, counts, strict=True)))
                for _ in range(10_000):
                    try:
                        received.append(rx.recv(2048))
                    except BlockingIOError:
                        break
                if block is None and len(received) < N:
                    select.select([ring, rx], [], [], min(left, 0.5))
            assert proc.wait(timeout=DEADLINE) == 0
    sizes_ok(received, size)
    assert route.packets == N
    assert route.bytes == sum(len(payload(s, size)) for s in range(N))
    assert (output.packets, output.bytes, output.errors) == (N, route.bytes, 0)
    assert totals.matched == totals.sent == N
    assert totals.slow >= N // 5  # the datagrams with IP options (and any IPv6 chatter)
    assert output.gso_max == (1472 if gso else 0)  # never refused


LOOPBACK = ["output", "lo", False], ["receiver", "127.0.0.1", 4009, ""]


def add(batch: SendBatch, dest: Destination, address: int, length: int) -> bool:
    """Queue one datagram of `length` bytes at `address`; False (nothing queued) when full."""
    return batch.extend(dest, array(IOVEC_TYPECODE, (address, length))) == 2


def test_send_errors_are_counted_not_raised(closing: contextlib.ExitStack) -> None:
    with topology.namespaces("x") as ns:
        out, rx = ns_sockets(closing, ns["x"], *LOOPBACK)
        dest = Destination("127.0.0.1", 4009)
        small = ctypes.create_string_buffer(b"hello", 5)
        huge = ctypes.create_string_buffer(70_000)  # over the UDP maximum: EMSGSIZE
        batch = SendBatch(capacity=4)
        for buf, length in ((small, 5), (huge, 70_000), (small, 5)):
            assert add(batch, dest, ctypes.addressof(buf), length)
        assert batch.flush(out) == (2, 1, 10, errno.EMSGSIZE)
        assert [rx.recv(100) for _ in range(2)] == [b"hello", b"hello"]
        assert add(batch, dest, ctypes.addressof(small), 5)
        out.close()
        assert batch.flush(out) == (0, 1, 0, errno.EBADF)
        assert len(batch) == 0


def test_gso_batches_count_datagrams(closing: contextlib.ExitStack) -> None:
    """Runs of equal sizes become GSO messages; results still count datagrams and bytes."""
    with topology.namespaces("x") as ns:
        out, rx = ns_sockets(closing, ns["x"], *LOOPBACK)
        dest = Destination("127.0.0.1", 4009)
        data = [payload(seq, 900) for seq in range(70)]
        data += [payload(70, 500), payload(71, 500), payload(72, 20), b""]
        bufs = [ctypes.create_string_buffer(d, len(d) or 1) for d in data]
        iovecs = array(IOVEC_TYPECODE)
        for buf, d in zip(bufs, data, strict=True):
            iovecs.extend((ctypes.addressof(buf), len(d)))
        batch = SendBatch(capacity=128)
        assert batch.extend(dest, iovecs, gso_max=65507) == len(iovecs)
        assert batch._m == 4  # 64 x 900; 6 x 900 + a 500 tail; 500 + 20 tail; 0
        assert batch.flush(out) == (74, 0, sum(map(len, data)), 0)
        assert [rx.recv(2048) for _ in data] == data


def test_udp_gso_max_reads_the_mtu() -> None:
    code = (
        "from mcrelay.dataplane.egress import udp_gso_max\n"
        "print(udp_gso_max('lo'))\n"
        "try:\n    udp_gso_max('nope0')\nexcept OSError as e:\n    print(e.errno)"
    )
    with topology.namespaces("x") as ns:
        ns["x"].ip("link", "set", "lo", "mtu", "9000")
        lines = ns["x"].run(sys.executable, "-c", code).split()
    assert lines == ["8972", str(errno.ENODEV)]


def test_missing_interface_is_named() -> None:
    with pytest.raises(OSError, match="'nope0' does not exist") as info:
        open_capture_socket("nope0", CAPTURE_RING, fanout_group=None)
    assert info.value.errno == errno.ENODEV


def test_a_new_reader_takes_over_the_ring_where_the_dead_one_stopped(
    pair: Pair, closing: contextlib.ExitStack
) -> None:
    """The ring outlives its reader (the socket is held elsewhere, as the supervisor holds it):
    a new reader starts at the oldest block nobody released, tells a block its predecessor
    had half sent (relayed again) from one it had sent in full (released at once)."""
    tx, rx = pair
    ring_spec = msgspec.structs.replace(CAPTURE_RING, block_size=1 << 16, block_count=128)
    (cap,) = ns_sockets(closing, rx, capture("rx0", None, ring_spec))

    def reader() -> RxRing:
        return RxRing(socket.socket(fileno=os.dup(cap.fileno())), ring_spec)

    def frames_waiting() -> int | None:
        with reader() as probe:  # nothing was begun yet: a look changes nothing
            found = probe.take_over()
        return found.frames if found.frames >= N else None

    with sender(tx) as proc:
        assert proc.wait(timeout=DEADLINE) == 0
    wait_for(frames_waiting, DEADLINE)

    first = reader()
    assert first.take_over().half_sent_frames == 0
    done = first.next_block()
    assert done is not None
    done.begin()
    done.end()
    done.release()
    half = first.next_block()
    assert half is not None and half.count > 0
    half.begin()  # ... and the reader dies before it ends
    half_seq, half_count = half.seq, half.count
    first.close()

    second = reader()
    found = second.take_over()
    assert (found.half_sent_frames, found.sent_blocks) == (half_count, 0)
    again = second.next_block()
    assert again is not None and again.seq == half_seq
    again.begin()
    again.end()  # sent in full, and the reader dies before it releases the block
    second.close()

    third = closing.enter_context(reader())
    found = third.take_over()
    assert (found.half_sent_frames, found.sent_blocks) == (0, 1)
    following = third.next_block()
    assert following is not None and following.seq == half_seq + 1
