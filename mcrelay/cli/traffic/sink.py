"""`mcrelay sink`: receive test datagrams and report loss, duplicates, order, integrity, latency.

Built to keep up with ~100k pps on one core: `recvmmsg` takes up to 64 datagrams per system
call, the kernel stamps each one (SO_TIMESTAMPNS, so latency excludes the sink's own lag), the
filler is compared in place, and sequence numbers go into a bitmap rather than a set.

Accounting, per stream: a datagram whose header parses and whose filler matches its seq is
*intact*; anything else is *corrupted* (and *malformed* if it has no valid header at all).
Corrupted datagrams are kept out of sequence accounting because their seq can't be trusted.
`expected` = max_seq - min_seq + 1 (or `count`, when given, for a single stream starting at 0,
so that loss at the tail shows), `lost` = expected - unique, `duplicated` = intact repeats,
`reordered` = new seqs that arrive below the highest seq seen so far. `max_gap_us` is the
longest silence: the largest interval between the receive times of consecutive datagrams (any
stream, any content), what an outage upstream looks like from here; `gaps` lists each silence of
10 ms or more (the 64 longest) with the datagrams on either side, so loss can be put down to it.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import select
import socket
import time
from collections.abc import Callable

import msgspec

from mcrelay.cli.traffic import payload
from mcrelay.cli.traffic.net import (
    CMSG_SPACE_TIMESPEC,
    HAVE_KERNEL_TIMESTAMPS,
    MmsgBatch,
    ToolError,
    have_mmsg,
    ifindex,
    is_multicast,
)
from mcrelay.system.linux import (
    IP_MULTICAST_ALL,
    SO_RCVBUFFORCE,
    SO_TIMESTAMPNS,
    ip_mreqn,
    set_buffer,
)

BATCH = 64
_SLOT = 1 << 16  # any UDP payload fits, so nothing is truncated
_WINDOW = 1 << 25  # seqs remembered per stream for duplicate detection (a 4 MiB bitmap)
GAP_RECORD_US = 10_000  # silences this long or longer are listed one by one
MAX_GAPS = 64


class StreamReport(msgspec.Struct, frozen=True):
    received: int
    unique: int
    min_seq: int
    max_seq: int
    expected: int
    lost: int
    duplicated: int
    reordered: int


class GapReport(msgspec.Struct, frozen=True):
    """A silence of at least GAP_RECORD_US: when it began, how long it lasted, and the datagrams
    on either side of it (stream and seq; None when one has no valid header)."""

    start_ns: int  # receive time (CLOCK_REALTIME ns) of the datagram before the silence
    gap_us: int
    before: tuple[int, int] | None
    after: tuple[int, int] | None
    #: Seqs missing between the two, when both are of one stream and in order.
    missing: int | None


class SinkReport(msgspec.Struct, frozen=True):
    """Totals over all streams plus each stream's own counts; latency in microseconds."""

    group: str
    port: int
    interface: str | None
    stopped_by: str  # "count", "duration", "idle" or "interrupt"
    received: int
    bytes: int
    expected: int
    lost: int
    duplicated: int
    reordered: int
    corrupted: int
    malformed: int
    elapsed_s: float
    active_s: float
    pps: float
    latency_p50_us: int | None
    latency_p90_us: int | None
    latency_p99_us: int | None
    latency_max_us: int | None
    latency_clock: str  # "kernel" (SO_TIMESTAMPNS) or "user" (time of recvmmsg return)
    socket_drops: int | None  # the kernel's count of datagrams dropped on a full receive buffer
    rcvbuf: int
    cpu_s: float
    streams: dict[int, StreamReport]
    # Largest interval between consecutive receive times (latency_clock); None below 2 datagrams.
    max_gap_us: int | None = None
    #: The longest silences of GAP_RECORD_US or more (at most MAX_GAPS), in time order.
    gaps: list[GapReport] = msgspec.field(default_factory=list)

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    def summary(self) -> str:
        where = f"{self.group}:{self.port}" + (f" on {self.interface}" if self.interface else "")
        lat = (
            f"latency µs  p50 {self.latency_p50_us}  p90 {self.latency_p90_us}"
            f"  p99 {self.latency_p99_us}  max {self.latency_max_us} ({self.latency_clock} clock)"
            if self.latency_max_us is not None
            else "latency     -"
        )
        return "\n".join(
            (
                f"sink {where}: stopped by {self.stopped_by} after {self.elapsed_s:.3f} s",
                f"  received {self.received} ({self.bytes} B, {len(self.streams)} stream(s))"
                f" at {self.pps:.0f} pps over {self.active_s:.3f} s",
                f"  lost {self.lost}/{self.expected}  duplicated {self.duplicated}"
                f"  reordered {self.reordered}  corrupted {self.corrupted}"
                f" (malformed {self.malformed})",
                f"  {lat}",
                "  max gap     "
                + (f"{self.max_gap_us} µs" if self.max_gap_us is not None else "-")
                + " between consecutive datagrams"
                + (
                    f" ({len(self.gaps)} of {GAP_RECORD_US // 1000} ms or more)"
                    if self.gaps
                    else ""
                ),
                f"  socket drops {self.socket_drops}  rcvbuf {self.rcvbuf} B"
                f"  cpu {self.cpu_s:.3f} s",
            )
        )


class _Stream:
    """Sequence accounting for one stream; seqs live in a bitmap over a sliding window."""

    __slots__ = (
        "base",
        "bits",
        "dup",
        "max_seq",
        "min_seq",
        "nbits",
        "received",
        "reord",
        "unique",
    )

    def __init__(self, seq: int) -> None:
        self.base = max(0, seq - 4096) & ~7
        self.bits = bytearray(1 << 13)
        self.nbits = len(self.bits) * 8
        self.min_seq = self.max_seq = seq
        self.received = self.unique = self.dup = self.reord = 0

    def add(self, seq: int) -> None:
        """Record an intact datagram; the fast path is inlined in `_Tally.add_batch`."""
        self.received += 1
        idx = seq - self.base
        where = idx if 0 <= idx < self.nbits else self._make_room(seq)
        if where is not None:
            j, m = where >> 3, 1 << (where & 7)
            if self.bits[j] & m:
                self.dup += 1
                return
            self.bits[j] |= m
        self.unique += 1
        if seq < self.max_seq:
            self.reord += 1
        else:
            self.max_seq = seq
        self.min_seq = min(self.min_seq, seq)

    def _make_room(self, seq: int) -> int | None:
        """Grow or slide the window to cover `seq`; None if `seq` is older than the window."""
        bits, cap = self.bits, _WINDOW // 8
        idx = seq - self.base
        if idx >= 0:
            need = idx // 8 + 1
            if need > cap:  # slide forward: `seq` lands mid-window, the oldest seqs are forgotten
                drop = need - cap // 2
                del bits[:drop]
                self.base += drop * 8
                need = cap
            bits.extend(bytes(min(cap, max(need, 2 * len(bits))) - len(bits)))
        else:
            need = -(idx // 8)  # bytes to prepend so that `seq` fits
            if need + len(bits) > cap:
                return None
            need = min(max(need, len(bits) // 2), cap - len(bits), self.base // 8)
            bits[:0] = bytes(need)
            self.base -= need * 8
        self.nbits = len(bits) * 8
        return seq - self.base

    def report(self, count: int | None, only: bool) -> StreamReport:
        expected = self.max_seq - self.min_seq + 1
        if count is not None and only and self.min_seq == 0:
            expected = max(expected, count)
        return StreamReport(
            received=self.received,
            unique=self.unique,
            min_seq=self.min_seq,
            max_seq=self.max_seq,
            expected=expected,
            lost=expected - self.unique,
            duplicated=self.dup,
            reordered=self.reord,
        )


class _Latency:
    """A log-linear histogram of µs values: exact below 256, within 0.8 % above; small memory."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.max: int | None = None

    def percentile(self, p: float) -> int | None:
        if not self.n:
            return None
        rank, seen = max(1, math.ceil(p * self.n)), 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= rank:
                return value
        return self.max


class _Tally:
    """Running counts over every datagram the sink has seen."""

    def __init__(self, expect_size: int | None) -> None:
        self.expect_size = expect_size
        self.streams: dict[int, _Stream] = {}
        self.received = self.bytes = self.corrupted = self.malformed = 0
        self.latency = _Latency()
        self.gaps = _Gaps()

    def add_batch(self, data: memoryview, slot: int, lengths: list[int], rx: list[int]) -> None:
        """Account for one batch; this loop is the sink's hot path, hence the local names."""
        unpack, magic, hsize = payload.HEADER.unpack_from, payload.MAGIC, payload.HEADER_SIZE
        offset_of, pattern_starts = payload.filler_offset, payload.PATTERN.startswith
        streams, counts, expect = self.streams, self.latency.counts, self.expect_size
        lat_max, timed = self.latency.max, 0
        stream_id, st = -1, None
        self.received += len(lengths)
        self.bytes += sum(lengths)
        self.gaps.add_batch(data, slot, lengths, rx)
        for i, size in enumerate(lengths):
            at = i * slot
            if size < hsize:
                self.malformed += 1
                continue
            tag, sid, seq, ts = unpack(data, at)
            if tag != magic:
                self.malformed += 1
                continue
            if (expect is not None and size != expect) or not pattern_starts(
                data[at + hsize : at + size], offset_of(seq, sid)
            ):
                self.corrupted += 1
                continue
            if sid != stream_id or st is None:
                st = streams.get(sid)
                if st is None:
                    st = streams[sid] = _Stream(seq)
                stream_id = sid
            idx = seq - st.base
            if 0 <= idx < st.nbits:  # fast path of _Stream.add
                st.received += 1
                j, m = idx >> 3, 1 << (idx & 7)
                b = st.bits[j]
                if b & m:
                    st.dup += 1
                    continue
                st.bits[j] = b | m
                st.unique += 1
                if seq > st.max_seq:
                    st.max_seq = seq
                else:
                    st.reord += seq < st.max_seq
                    if seq < st.min_seq:
                        st.min_seq = seq
            else:
                before = st.dup
                st.add(seq)
                if st.dup != before:
                    continue
            us = (rx[i] - ts) // 1000
            if lat_max is None or us > lat_max:
                lat_max = us
            if us >= 256:
                shift = us.bit_length() - 8
                us = us >> shift << shift
            counts[us] = counts.get(us, 0) + 1
            timed += 1
        self.latency.max = lat_max
        self.latency.n += timed


class _Gaps:
    """The longest silence between consecutive datagrams, and each one of GAP_RECORD_US or more
    with the datagrams around it; per batch one C-level pass over its receive times."""

    def __init__(self) -> None:
        self.last_rx: int | None = None  # receive time (ns) of the latest datagram
        self.last_id: tuple[int, int] | None = None  # its (stream, seq)
        self.max_ns: int | None = None
        self.found: list[GapReport] = []

    def add_batch(self, data: memoryview, slot: int, lengths: list[int], rx: list[int]) -> None:
        if not rx:
            return
        times = rx if self.last_rx is None else [self.last_rx, *rx]
        if len(times) > 1:
            diffs = list(map(operator.sub, times[1:], times[:-1]))
            gap = max(0, *diffs)
            if self.max_ns is None or gap > self.max_ns:
                self.max_ns = gap
            if gap >= GAP_RECORD_US * 1000:
                self._record(data, slot, lengths, times, diffs)
        self.last_rx = rx[-1]
        self.last_id = _ident(data, slot, lengths, len(lengths) - 1)

    def _record(
        self, data: memoryview, slot: int, lengths: list[int], times: list[int], diffs: list[int]
    ) -> None:
        shift = len(times) - len(lengths)  # 1 when times[0] is the previous batch's last
        for i, gap in enumerate(diffs):
            if gap < GAP_RECORD_US * 1000:
                continue
            j = i - shift  # the datagram before the silence, in this batch (-1: the previous)
            before = self.last_id if j < 0 else _ident(data, slot, lengths, j)
            after = _ident(data, slot, lengths, j + 1)
            missing = None
            if before and after and before[0] == after[0] and after[1] > before[1]:
                missing = after[1] - before[1] - 1
            self.found.append(GapReport(times[i], gap // 1000, before, after, missing))
        if len(self.found) > MAX_GAPS:  # the longest, still in time order
            longest = sorted(self.found, key=lambda g: g.gap_us, reverse=True)[:MAX_GAPS]
            self.found = sorted(longest, key=lambda g: g.start_ns)

    @property
    def max_us(self) -> int | None:
        return self.max_ns // 1000 if self.max_ns is not None else None


def _ident(data: memoryview, slot: int, lengths: list[int], i: int) -> tuple[int, int] | None:
    """(stream, seq) of datagram ``i`` of a batch, None if it has no valid header."""
    if i < 0 or lengths[i] < payload.HEADER_SIZE:
        return None
    tag, stream, seq, _ = payload.HEADER.unpack_from(data, i * slot)
    return (stream, seq) if tag == payload.MAGIC else None


def open_receiver(group: str, port: int, interface: str | None) -> socket.socket:
    """A bound, non-blocking UDP socket, joined to `group` on `interface` if multicast."""
    multicast = is_multicast(group)
    if multicast and interface is None:
        raise ToolError("a multicast group needs --interface to join on")
    index = ifindex(interface) if interface is not None else 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if interface is not None:
            with contextlib.suppress(PermissionError):  # a filter only; the join picks the link
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind((group, port))
        if multicast:
            with contextlib.suppress(OSError):  # only the groups this socket joined
                sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            mreq = ip_mreqn(group, index=index)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, 1 << 25)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        what = f"join {group} on {interface}" if multicast else f"bind {group}:{port}"
        raise ToolError(f"cannot {what}: {exc.strerror or exc}") from None
    return sock


def _socket_drops(sock: socket.socket) -> int | None:
    """The drops column of /proc/net/udp for this socket (this network namespace)."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    try:
        with open("/proc/net/udp") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 12 and fields[9] == inode:
                    return int(fields[-1])
    except OSError:
        pass
    return None


class _Receiver:
    """recvmmsg with kernel timestamps where available, recv_into one by one otherwise."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.fd = sock, sock.fileno()
        self.kernel_clock = False
        if HAVE_KERNEL_TIMESTAMPS:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                self.kernel_clock = True
            except OSError:
                pass
        ctrl = CMSG_SPACE_TIMESPEC * 2 if self.kernel_clock else 0
        self.batch = MmsgBatch(BATCH, _SLOT, ctrl=ctrl) if have_mmsg() else None
        self.kernel_clock &= self.batch is not None
        self.slot = _SLOT
        self.data = memoryview(self.batch.data if self.batch else bytearray(_SLOT))

    def receive(self, limit: int) -> tuple[list[int], list[int]]:
        """Lengths and receive times (ns) of what is queued; BlockingIOError when nothing is."""
        if self.batch is None:
            lengths = [self.sock.recv_into(self.data, _SLOT, socket.MSG_DONTWAIT)]
            return lengths, [time.clock_gettime_ns(time.CLOCK_REALTIME)]
        n = self.batch.recv(self.fd, min(limit, BATCH))
        lengths = self.batch.lengths(n)
        if not self.kernel_clock:
            return lengths, [time.clock_gettime_ns(time.CLOCK_REALTIME)] * n
        times = self.batch.kernel_times(n)
        if 0 in times:
            now = time.clock_gettime_ns(time.CLOCK_REALTIME)
            times = [t or now for t in times]
        return lengths, times


def _receive(
    rx: _Receiver, tally: _Tally, count: int | None, duration: float | None, idle_timeout: float
) -> tuple[str, int, int]:
    """The receive loop; returns why it stopped and the monotonic ns of first and last batch."""
    poller = select.poll()
    poller.register(rx.fd, select.POLLIN)
    now = time.monotonic_ns()
    end_at = now + int(duration * 1e9) if duration is not None else None
    idle_ns = int(idle_timeout * 1e9)
    first = last = 0
    try:
        while True:
            if count is not None and tally.received >= count:
                return "count", first, last
            now = time.monotonic_ns()
            if end_at is not None and now >= end_at:
                return "duration", first, last
            try:
                lengths, times = rx.receive(BATCH if count is None else count - tally.received)
            except BlockingIOError:
                waits = [end_at - now] if end_at is not None else []
                if first and idle_ns > 0:
                    if now - last >= idle_ns:
                        return "idle", first, last
                    waits.append(last + idle_ns - now)
                poller.poll(max(1, math.ceil(min(waits) / 1e6)) if waits else None)
                continue
            last = time.monotonic_ns()
            first = first or last
            tally.add_batch(rx.data, rx.slot, lengths, times)
    except KeyboardInterrupt:
        return "interrupt", first, last


def run_sink(
    group: str,
    port: int,
    *,
    interface: str | None,
    count: int | None = None,
    duration: float | None = None,
    idle_timeout: float = 2.0,
    expect_size: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> SinkReport:
    """Receive until `count` datagrams, `duration` seconds, or `idle_timeout` s of silence.

    The idle timer starts at the first datagram (0 disables it); `on_ready` runs once the
    socket is bound and joined, so a caller can start a sender without guessing.
    """
    if expect_size is not None:
        payload.check_size(expect_size)
    sock = open_receiver(group, port, interface)
    try:
        rx = _Receiver(sock)
        tally = _Tally(expect_size)
        cpu0 = time.process_time()
        start = time.monotonic_ns()
        if on_ready is not None:
            on_ready()
        try:
            stopped_by, first, last = _receive(rx, tally, count, duration, idle_timeout)
        except OSError as exc:
            raise ToolError(f"receive on {group}:{port} failed: {exc.strerror or exc}") from None
        elapsed = (time.monotonic_ns() - start) / 1e9
        drops = _socket_drops(sock)
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    finally:
        sock.close()
    streams = {sid: st.report(count, len(tally.streams) == 1) for sid, st in tally.streams.items()}
    active = (last - first) / 1e9
    lat = tally.latency
    return SinkReport(
        group=group,
        port=port,
        interface=interface,
        stopped_by=stopped_by,
        received=tally.received,
        bytes=tally.bytes,
        expected=sum(r.expected for r in streams.values()),
        lost=sum(r.lost for r in streams.values()),
        duplicated=sum(r.duplicated for r in streams.values()),
        reordered=sum(r.reordered for r in streams.values()),
        corrupted=tally.corrupted + tally.malformed,
        malformed=tally.malformed,
        elapsed_s=round(elapsed, 6),
        active_s=round(active, 6),
        pps=round((tally.received - 1) / active, 1) if active > 0 else 0.0,
        latency_p50_us=lat.percentile(0.50),
        latency_p90_us=lat.percentile(0.90),
        latency_p99_us=lat.percentile(0.99),
        latency_max_us=lat.max,
        latency_clock="kernel" if rx.kernel_clock else "user",
        socket_drops=drops,
        rcvbuf=rcvbuf,
        cpu_s=round(time.process_time() - cpu0, 3),
        streams=streams,
        max_gap_us=tally.gaps.max_us,
        gaps=tally.gaps.found,
    )
