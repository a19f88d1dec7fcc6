"""`mcrelay gen`: send numbered test datagrams to a group (or unicast address) at a steady rate.

IP_RECVERR is on so that a datagram the local qdisc drops fails with ENOBUFS (Linux otherwise
reports success) and is sent again: `sent` then means handed to the device, and loss seen by a
sink is not the generator's own. The price is that ICMP errors (port unreachable for unicast)
surface on send; they are drained from the error queue and counted.

Pacing follows an absolute schedule: datagram i is due at t0 + i/rate, so a late wake-up is
made up by the next burst instead of shifting everything after it (no drift). The sender only
sleeps when it is ahead of the schedule.
"""

from __future__ import annotations

import errno
import select
import socket
import sys
import time

import msgspec

from mcrelay.cli.traffic import payload
from mcrelay.cli.traffic.net import (
    MmsgBatch,
    ToolError,
    have_mmsg,
    ifindex,
    is_multicast,
    sockaddr_in,
)
from mcrelay.system.linux import IP_RECVERR, SO_SNDBUFFORCE, ip_mreqn, set_buffer

BATCH = 32  # datagrams per sendmmsg: small enough that a burst stays a burst
_RETRY = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR})
_PROGRESS_NS = 250_000_000


class GenReport(msgspec.Struct, frozen=True):
    """What gen did; `pps` is the achieved rate over the whole run."""

    group: str
    port: int
    size: int
    count: int
    rate: float
    stream: int
    sent: int
    elapsed_s: float
    pps: float
    retries: int
    icmp_errors: int
    interrupted: bool = False

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    def summary(self) -> str:
        mbit = self.pps * self.size * 8 / 1e6
        line = (
            f"sent {self.sent}/{self.count} × {self.size} B to {self.group}:{self.port}"
            f" in {self.elapsed_s:.3f} s: {self.pps:.0f} pps ({mbit:.1f} Mbit/s payload),"
            f" {self.retries} send retries, {self.icmp_errors} ICMP errors"
        )
        return line + (" (interrupted)" if self.interrupted else "")


def open_sender(
    group: str, port: int, *, interface: str | None, source: str | None, ttl: int
) -> socket.socket:
    """A non-blocking UDP socket whose egress is chosen by `interface` or `source`."""
    multicast = is_multicast(group)
    index = ifindex(interface) if interface is not None else 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        if interface is not None:
            if multicast:
                mreq = ip_mreqn(group, index=index)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreq)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            except PermissionError:
                if not multicast:  # IP_MULTICAST_IF alone steers multicast; unicast needs this
                    raise
        if source is not None:
            try:
                sock.bind((source, 0))
            except OSError as exc:
                raise ToolError(f"cannot use source {source}: {exc.strerror}") from None
            if multicast:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, ip_mreqn(group, source))
        set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, 1 << 22)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ToolError(f"cannot set up sending socket: {exc.strerror or exc}") from None
    except ToolError:
        sock.close()
        raise
    return sock


class _Sender:
    """Sends datagrams first..first+n-1 as one batch; returns how many the kernel took."""

    def __init__(self, sock: socket.socket, dest: tuple[str, int], size: int, stream: int) -> None:
        self.sock, self.dest, self.size, self.stream = sock, dest, size, stream
        self.batch = MmsgBatch(BATCH, size, name=sockaddr_in(*dest)) if have_mmsg() else None

    def send(self, first: int, n: int) -> int:
        now = time.clock_gettime_ns(time.CLOCK_REALTIME)
        if self.batch is None:
            for i in range(n):
                data = payload.expected_payload(first + i, self.size, self.stream, now)
                try:
                    self.sock.sendto(data, self.dest)
                except OSError:
                    if i:
                        return i
                    raise
            return n
        buf, size, stream = self.batch.data, self.size, self.stream
        for i in range(n):
            payload.write_payload(buf, i * size, first + i, size, stream, now)
        return self.batch.send(self.sock.fileno(), n)


def _drain_errors(sock: socket.socket) -> int:
    """Read queued ICMP reports; a non-zero count means the send error was one of them."""
    drained = 0
    while True:
        try:
            sock.recvmsg(1, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except OSError:
            return drained
        drained += 1


def _wait_after(err: int, sock: socket.socket) -> None:
    """Back off briefly: until writable for a full buffer, a moment for a full qdisc."""
    if err in (errno.EAGAIN, errno.EWOULDBLOCK):
        select.select([], [sock], [], 0.005)
    elif err == errno.ENOBUFS:
        time.sleep(0.0001)


def run_gen(
    group: str,
    port: int,
    *,
    interface: str | None = None,
    source: str | None = None,
    rate: float,
    count: int,
    size: int,
    ttl: int = 8,
    progress: bool = False,
    stream: int = 0,
    stall_timeout: float = 5.0,
) -> GenReport:
    """Send `count` datagrams of `size` bytes at `rate` per second (0: as fast as possible).

    Transient send errors (full buffer or qdisc) are retried within the schedule and counted;
    if nothing can be sent for `stall_timeout` seconds, ToolError ends the run.
    """
    payload.check_size(size)
    if rate < 0 or count < 0:
        raise ValueError("rate and count must not be negative")
    if interface is not None and source is not None:
        raise ValueError("choose either interface or source, not both")
    sock = open_sender(group, port, interface=interface, source=source, ttl=ttl)
    sender = _Sender(sock, (group, port), size, stream)
    sent = retries = icmp_errors = 0
    interrupted = False
    t0 = last_ok = shown_at = time.monotonic_ns()
    first_at = last_at = t0
    shown_sent, drawn = 0, False
    try:
        while sent < count:
            now = time.monotonic_ns()
            want = count - sent
            if rate > 0:
                due = min(count, int((now - t0) * rate / 1e9) + 1)
                if due <= sent:
                    time.sleep(max(0.0, (t0 + sent * 1e9 / rate - now) / 1e9))
                    continue
                want = due - sent
            try:
                went = sender.send(sent, min(want, BATCH))
                last_ok = last_at = time.monotonic_ns()
                if not sent:
                    first_at = now
                sent += went
            except OSError as exc:
                if exc.errno in _RETRY:
                    retries += exc.errno != errno.EINTR
                elif drained := _drain_errors(sock):
                    icmp_errors += drained
                else:
                    hint = ""
                    if exc.errno == errno.ENETUNREACH and interface is None and source is None:
                        hint = " (no route: pick the egress with --interface or --source)"
                    raise ToolError(
                        f"send to {group}:{port} failed: {exc.strerror}{hint}"
                    ) from None
                if now - last_ok > stall_timeout * 1e9:
                    raise ToolError(f"send to {group}:{port} stalled: {exc.strerror}") from None
                _wait_after(exc.errno or 0, sock)
            if progress and now - shown_at >= _PROGRESS_NS:
                pps = (sent - shown_sent) * 1e9 / (now - shown_at)
                sys.stderr.write(f"\rsent {sent}/{count}  {pps:,.0f} pps \x1b[K")
                sys.stderr.flush()
                shown_at, shown_sent, drawn = now, sent, True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sock.close()
        if drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
    elapsed = (time.monotonic_ns() - t0) / 1e9
    # The rate between first and last send is what pacing controls; sent/elapsed overstates it.
    span = (last_at - first_at) / 1e9
    pps = (sent - 1) / span if sent > 1 and span > 0 else sent / elapsed if elapsed > 0 else 0.0
    return GenReport(
        group=group,
        port=port,
        size=size,
        count=count,
        rate=rate,
        stream=stream,
        sent=sent,
        elapsed_s=round(elapsed, 6),
        pps=round(pps, 1),
        retries=retries,
        icmp_errors=icmp_errors,
        interrupted=interrupted,
    )
