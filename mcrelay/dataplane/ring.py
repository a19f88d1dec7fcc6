"""A TPACKET_V3 receive ring: frames arrive in shared memory, with no system call per packet.

The kernel fills fixed-size blocks in ring order and hands each one to user space (status
TP_STATUS_USER) when it is full or its retire timer expires; the socket polls readable then.
User space walks the block's frames in place and hands it back (TP_STATUS_KERNEL). If every
block is still held, the kernel freezes the queue and drops frames until the next block in ring
order comes back, so blocks must be released promptly, and only after egress is done with
buffers that point into them.

The ring outlives its reader: the supervisor keeps the socket when a data worker dies, frames
keep landing in the ring, and the replacement maps the same ring (`RxRing.take_over`) and goes
on from the oldest block nobody released. Each block's private area (which the kernel never
writes) records how far its reader got: the block's sequence number when relaying began, and
again when it ended, so a successor tells a block nobody touched from one its predecessor had
half sent (relayed again: its receivers see duplicates, never a hole) or fully sent but not yet
released (released at once).

Layouts (<linux/if_packet.h>), little-endian on every architecture Linux runs this on:
``tpacket_block_desc`` (48 bytes: version, offset_to_priv, block_status, num_pkts,
offset_to_first_pkt, blk_len, seq_num, timestamps), then frames, each a ``tpacket3_hdr``
(48 bytes) followed by a ``sockaddr_ll`` and, at ``tp_mac``, the frame itself.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import mmap
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, Self

from mcrelay.ipc.messages import CaptureSpec
from mcrelay.system.linux import (
    PACKET_RX_RING,
    PACKET_STATISTICS,
    PACKET_VERSION,
    SOL_PACKET,
    TP_STATUS_KERNEL,
    TP_STATUS_LOSING,
    TP_STATUS_USER,
    TP_STATUS_VLAN_VALID,
    TPACKET3_HDRLEN,
    TPACKET_V3,
)

__all__ = [
    "Block",
    "BlockProgress",
    "Frame",
    "RingStats",
    "RxRing",
    "Takeover",
    "configure",
    "read_statistics",
]

# tpacket_block_desc: block_status, num_pkts, offset_to_first_pkt, blk_len, seq_num
_BLOCK = struct.Struct("<8xIIII Q")
_STATUS = struct.Struct("<I")
_BLOCK_STATUS_AT = 8
_PRIV_AT = struct.Struct("<4xI")  # offset_to_priv
# The block's private area: the seq it had when relaying it began, and when it ended.
_PROGRESS = struct.Struct("<QQ")
PRIV_BYTES = _PROGRESS.size
# tpacket3_hdr: next_offset, snaplen, len, status, mac, vlan_tci; sockaddr_ll: pkttype
_FRAME = struct.Struct("<I8xIIIH6xI22xB")
_STATS = struct.Struct("=III")
_REQ3 = struct.Struct("=7I")


class Frame(NamedTuple):
    """One captured frame; its bytes are ``ring.buffer[mac : mac + snaplen]``."""

    mac: int  # offset of the Ethernet header in the ring's mapping
    snaplen: int  # bytes captured
    length: int  # bytes on the wire (> snaplen: truncated)
    pkttype: int  # sockaddr_ll.sll_pkttype: PACKET_HOST, PACKET_MULTICAST, ...
    status: int  # tp_status flags
    vlan_tci: int | None  # outer 802.1Q tag the kernel stripped, if any


@dataclass
class RingStats:
    """Counters accumulated over every read, since reading PACKET_STATISTICS resets them."""

    packets: int = 0  # frames the socket was offered, drops included (the kernel's count)
    drops: int = 0  # frames lost because no block was free
    freezes: int = 0  # times the kernel found the ring full and froze it


class Block:
    """A block the kernel handed over; walk it, then `release` it exactly once."""

    __slots__ = ("_released", "count", "first", "index", "offset", "priv", "ring", "seq", "status")

    def __init__(self, ring: RxRing, index: int, offset: int) -> None:
        status, count, first, _length, seq = _BLOCK.unpack_from(ring.buffer, offset)
        self.ring = ring
        self.index = index
        self.offset = offset  # of the block in ring.buffer
        self.status = status
        self.count = count  # frames in the block
        self.first = offset + first  # of the first frame header in ring.buffer
        self.seq = seq
        self.priv = offset + _PRIV_AT.unpack_from(ring.buffer, offset)[0]
        self._released = False

    @property
    def losing(self) -> bool:
        """Frames were dropped before this block was closed: read `RxRing.stats` to count them."""
        return bool(self.status & TP_STATUS_LOSING)

    def frames(self) -> Iterator[Frame]:
        """Every frame, as `Frame` tuples (convenient; the relay loop walks blocks inline)."""
        buf = self.ring.buffer
        off = self.first
        for _ in range(self.count):
            nxt, snaplen, length, status, mac, tci, pkttype = _FRAME.unpack_from(buf, off)
            vlan = tci if status & TP_STATUS_VLAN_VALID else None
            yield Frame(off + mac, snaplen, length, pkttype, status, vlan)
            off += nxt

    def progress(self) -> BlockProgress:
        """How far a reader of this ring got with this block (`begin`/`end` recorded it)."""
        began, ended = _PROGRESS.unpack_from(self.ring.buffer, self.priv)
        seq = self.seq
        if ended == seq:
            return BlockProgress.SENT
        return BlockProgress.HALF_SENT if began == seq else BlockProgress.UNTOUCHED

    def begin(self) -> None:
        """Record, in the ring, that relaying this block has begun (for a successor)."""
        _PROGRESS.pack_into(self.ring.buffer, self.priv, self.seq, 0)

    def end(self) -> None:
        """Record that every frame of this block was handed to the kernel for sending."""
        _PROGRESS.pack_into(self.ring.buffer, self.priv, self.seq, self.seq)

    def release(self) -> None:
        """Hand the block back to the kernel; nothing may point into it any more."""
        if self._released:
            return
        self._released = True
        _STATUS.pack_into(self.ring.buffer, self.offset + _BLOCK_STATUS_AT, TP_STATUS_KERNEL)


class BlockProgress(enum.Enum):
    """What the ring says a reader did with a block it had not released."""

    UNTOUCHED = "untouched"
    HALF_SENT = "half-sent"  # relaying began and did not end: some frames may have left
    SENT = "sent"  # every frame left; only the release is missing


@dataclass(frozen=True)
class Takeover:
    """What a new reader found in a ring its predecessor left: blocks held (filled, never
    released) and their frames, and the frames of a block the predecessor had half sent."""

    blocks: int
    frames: int
    half_sent_frames: int
    #: Blocks the predecessor had sent in full but not released: released without relaying.
    sent_blocks: int


def configure(sock: socket.socket, spec: CaptureSpec) -> None:
    """Install the TPACKET_V3 receive ring `spec` on ``sock`` (replacing one left by a previous
    owner).

    The supervisor calls this before it binds a capture socket and joins its fanout group, so
    no frame ever lands in the ordinary receive queue, which installing a ring later would purge.
    """
    block_size, block_count = spec.block_size, spec.block_count
    frame_size, retire_ms = spec.frame_size, spec.retire_ms
    if block_size <= 0 or block_size % mmap.PAGESIZE or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power-of-two multiple of a page: {block_size}")
    if frame_size % 16 or not TPACKET3_HDRLEN < frame_size <= block_size:
        raise ValueError(f"frame_size must be a multiple of 16 within the block: {frame_size}")
    if block_count <= 0 or retire_ms <= 0:
        raise ValueError("block_count and retire_ms must be positive")
    req = _REQ3.pack(
        block_size, block_count, frame_size, (block_size // frame_size) * block_count,
        retire_ms, PRIV_BYTES, 0,
    )  # fmt: skip
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        # A ring exists; tearing it down also resets the version lock.
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, _REQ3.pack(0, 0, 0, 0, 0, 0, 0))
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
    sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)


class RxRing:
    """The PACKET_RX_RING (TPACKET_V3) of a bound AF_PACKET socket, mapped; owns the socket.

    The ring is already on the socket, installed with `configure` from the same `spec` (by the
    supervisor, before bind): this only maps it, so a data worker never sets an option on a
    capture socket: `mcrelay.dataplane.ring_size.CAPTURE_RING` says how much it holds. A block is
    handed over when full or after its retire timeout, so a lone frame waits at most that long
    (rounded up to a jiffy on kernels whose retire timer is jiffy based).
    """

    def __init__(self, sock: socket.socket, spec: CaptureSpec) -> None:
        self._sock = sock
        self.block_size = spec.block_size
        self.block_count = spec.block_count
        self._next = 0
        self._stats = RingStats()
        self.buffer = mmap.mmap(sock.fileno(), spec.mapped_size, mmap.MAP_SHARED)
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self.buffer)
        self.address = ctypes.addressof(self._anchor)  # of ring.buffer[0], for zero-copy sends

    def fileno(self) -> int:
        """Readable when a block was retired (for `trio.lowlevel.wait_readable`)."""
        return self._sock.fileno()

    def next_block(self) -> Block | None:
        """The next block in ring order if the kernel handed it over, else None.

        Blocks come in ring order, so more than one may be held; release each before waiting for
        readability again, or the socket keeps polling readable.
        """
        offset = self._next * self.block_size
        (status,) = _STATUS.unpack_from(self.buffer, offset + _BLOCK_STATUS_AT)
        if not status & TP_STATUS_USER:
            return None
        block = Block(self, self._next, offset)
        self._next = (self._next + 1) % self.block_count
        return block

    def take_over(self) -> Takeover:
        """Start from the oldest block a previous reader left held, and release at once the
        blocks it had sent in full; what was found. A new ring holds none: nothing changes.

        When nothing is held the kernel's current block is unknown here; `next_block` then
        finds nothing when the socket polls readable, and `resync` points it at the block.
        """
        held = [index for _seq, index in self._held()]
        if not held:
            return Takeover(0, 0, 0, 0)
        # Blocks are begun and released in ring order: only the oldest can have been begun.
        oldest = Block(self, held[0], held[0] * self.block_size)
        progress = oldest.progress()
        sent = 0
        if progress is BlockProgress.SENT:
            oldest.release()  # only the release was missing
            held, sent = held[1:], 1
        half_sent = oldest.count if progress is BlockProgress.HALF_SENT else 0
        frames = sum(Block(self, index, index * self.block_size).count for index in held)
        if held:
            self._next = held[0]
        return Takeover(len(held), frames, half_sent, sent)

    def _held(self) -> list[tuple[int, int]]:
        """(seq, index) of every block user space holds, oldest first."""
        held = []
        for index in range(self.block_count):
            offset = index * self.block_size
            status, _count, _first, _length, seq = _BLOCK.unpack_from(self.buffer, offset)
            if status & TP_STATUS_USER:
                held.append((seq, index))
        return sorted(held)

    def resync(self) -> bool:
        """Point `next_block` at the oldest block user space holds; False if it holds none.

        For a loop that polled readable but found its next block not ready: the kernel and a
        reader of a new ring walk it in the same order from block 0, but a reader that took
        over a ring in which nothing was held does not know where the kernel is.
        """
        held = self._held()
        if not held:
            return False
        self._next = held[0][1]
        return True

    def stats(self) -> RingStats:
        """Read (and so reset) the kernel counters; return the totals since the ring was made."""
        packets, drops, freezes = read_statistics(self._sock)
        s = self._stats
        s.packets += packets
        s.drops += drops
        s.freezes += freezes
        return RingStats(s.packets, s.drops, s.freezes)

    def error(self) -> int:
        """Take the socket's pending error (ENETDOWN after the link went down), 0 if none.

        A pending error keeps the socket polling readable with no block ready, so a loop that
        woke for nothing must take it.
        """
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def close(self) -> None:
        """Unmap the ring and close the socket; `Frame` views into `buffer` must be gone."""
        self._anchor = None
        try:
            if not self.buffer.closed:
                self.buffer.close()
        finally:
            self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_statistics(sock: socket.socket) -> tuple[int, int, int]:
    """Frames offered, dropped for want of a block, and ring freezes since the last read of
    this socket's counters, by anyone (reading resets them)."""
    raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS.size)
    packets, drops, freezes = _STATS.unpack(raw)
    return packets, drops, freezes
