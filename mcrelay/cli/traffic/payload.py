"""The test payload that `mcrelay gen` sends and `mcrelay sink` checks, defined once.

Layout (network byte order)::

    0   magic      4 bytes  b"MCRL"
    4   stream     u32      tells concurrent generators apart
    8   seq        u64      0, 1, 2, … per stream
    16  ts_ns      u64      CLOCK_REALTIME at send, so namespaces on one host compare
    24  filler     size - 24 bytes, a slice of a fixed pseudo-random pattern

The filler depends only on (seq, stream), so a receiver can check every byte without keeping
what was sent; a pseudo-random pattern (not a counter) also catches shifted or zeroed bytes.
"""

from __future__ import annotations

import hashlib
import struct
import time

MAGIC = b"MCRL"
HEADER = struct.Struct("!4sIQQ")
HEADER_SIZE = HEADER.size
MAX_SIZE = 65507  # largest UDP payload over IPv4
_OFFSETS = 4096  # the filler starts at one of this many places in the pattern
PATTERN = hashlib.shake_256(b"mcrelay test payload v1").digest(MAX_SIZE - HEADER_SIZE + _OFFSETS)


def check_size(size: int) -> int:
    """Return `size` if a payload can have it, else raise ValueError naming the bounds."""
    if not HEADER_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"payload size must be {HEADER_SIZE}..{MAX_SIZE} bytes, got {size}")
    return size


def filler_offset(seq: int, stream: int) -> int:
    """Where in PATTERN the filler of (seq, stream) starts; neighbours start far apart."""
    return (seq * 0x9E3779B1 + stream * 0x85EBCA77) % _OFFSETS


def expected_payload(seq: int, size: int, stream: int = 0, ts_ns: int = 0) -> bytes:
    """The exact bytes gen sends for `seq` stamped `ts_ns`, the one field a receiver can't know."""
    check_size(size)
    start = filler_offset(seq, stream)
    return HEADER.pack(MAGIC, stream, seq, ts_ns) + PATTERN[start : start + size - HEADER_SIZE]


def build_payload(seq: int, size: int, stream: int = 0, ts_ns: int | None = None) -> bytes:
    """A payload stamped now (or at `ts_ns`)."""
    if ts_ns is None:
        ts_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
    return expected_payload(seq, size, stream, ts_ns)


def write_payload(
    buf: bytearray | memoryview, offset: int, seq: int, size: int, stream: int, ts_ns: int
) -> None:
    """Write the payload into `buf` at `offset` in place; gen fills its batch buffers with this."""
    start = filler_offset(seq, stream)
    HEADER.pack_into(buf, offset, MAGIC, stream, seq, ts_ns)
    buf[offset + HEADER_SIZE : offset + size] = PATTERN[start : start + size - HEADER_SIZE]


def parse_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int] | None:
    """(stream, seq, ts_ns), or None when `data` is too short or lacks the magic."""
    if len(data) < HEADER_SIZE:
        return None
    magic, stream, seq, ts_ns = HEADER.unpack_from(data)
    if magic != MAGIC:
        return None
    return stream, seq, ts_ns


def filler_ok(data: bytes | bytearray | memoryview, seq: int, stream: int) -> bool:
    """True when everything after the header is what gen wrote for (seq, stream).

    Together with a parsed header this is byte-identity with `expected_payload`; it compares
    in place (no copies), which keeps the sink fast.
    """
    return PATTERN.startswith(memoryview(data)[HEADER_SIZE:], filler_offset(seq, stream))
