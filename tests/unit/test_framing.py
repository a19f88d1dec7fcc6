"""Frames over real socketpairs: limits, garbage, EOF and descriptors riding along."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator

import pytest
import trio

from mcrelay.errors import ChannelClosed, ProtocolError
from mcrelay.ipc import messages as m
from mcrelay.ipc.framing import FRAGMENT_SIZE, MORE_FRAGMENTS, FrameChannel, encode


@contextlib.contextmanager
def pair(max_frame: int = 1024) -> Iterator[tuple[FrameChannel, trio.socket.SocketType]]:
    a, b = trio.socket.socketpair()
    channel = FrameChannel(a, m.SupervisorToWorker, max_frame=max_frame)
    try:
        yield channel, b
    finally:
        channel.close()
        b.close()


async def test_round_trip_and_fds() -> None:
    a, b = trio.socket.socketpair()
    sender = FrameChannel(a, m.SupervisorToWorker)
    receiver = FrameChannel(b, m.SupervisorToWorker)
    r, w = os.pipe()
    try:
        await sender.send(m.ListenSocket(), [r])
        await sender.send(m.Heartbeat(n=7))
        assert await receiver.receive() == m.ListenSocket()
        (fd,) = receiver.take_fds(1)
        os.write(w, b"x")
        assert os.read(fd, 1) == b"x"
        os.close(fd)
        assert await receiver.receive() == m.Heartbeat(n=7)
        with pytest.raises(ProtocolError):
            receiver.take_fds(1)
    finally:
        os.close(r)
        os.close(w)
        sender.close()
        receiver.close()


async def test_oversized_frame_is_refused_before_reading_it() -> None:
    with pair(max_frame=100) as (channel, raw):
        await raw.send(struct.pack("!I", 10_000))
        with pytest.raises(ProtocolError, match="exceeds limit"):
            await channel.receive()


async def test_garbage_and_wrong_types() -> None:
    with pair() as (channel, raw):
        await raw.send(struct.pack("!I", 3) + b"\xc1\xc1\xc1")
        with pytest.raises(ProtocolError):
            await channel.receive()
    with pair() as (channel, raw):
        await raw.send(encode({"t": "hb", "n": "not a number"}))
        with pytest.raises(ProtocolError, match="invalid message"):
            await channel.receive()


async def test_eof_is_channel_closed() -> None:
    with pair() as (channel, raw):
        await raw.send(struct.pack("!I", 10)[:2])
        raw.close()
        with pytest.raises(ChannelClosed):
            await channel.receive()


async def test_send_cut_off_mid_frame_tears_the_channel(autojump_clock: trio.abc.Clock) -> None:
    with pair() as (channel, _peer):
        huge = m.Hello(version=1, role="supervisor", worker_id="x" * (4 * 1024 * 1024))
        with trio.move_on_after(1) as scope:
            await channel.send(huge)  # the peer never reads: part of it goes out, then it blocks
        assert scope.cancelled_caught
        # Another frame now would start inside the cut one: refused instead of written.
        with pytest.raises(ChannelClosed, match="mid-frame"):
            await channel.send(m.Heartbeat(n=1))


async def test_send_cancelled_before_any_byte_keeps_the_channel(
    autojump_clock: trio.abc.Clock,
) -> None:
    a, b = trio.socket.socketpair()
    sender = FrameChannel(a, m.SupervisorToWorker)
    receiver = FrameChannel(b, m.SupervisorToWorker)
    try:
        with trio.CancelScope() as scope:
            scope.cancel()
            await sender.send(m.Heartbeat(n=1))
        await sender.send(m.Heartbeat(n=2))
        assert await receiver.receive() == m.Heartbeat(n=2)
    finally:
        sender.close()
        receiver.close()


async def test_a_message_larger_than_a_fragment_goes_as_several_frames() -> None:
    """Rule syncs and replies of many MiB are split into FRAGMENT_SIZE frames and joined again,
    so no single frame ever approaches the frame limit; descriptors and order are kept."""
    a, b = trio.socket.socketpair()
    sender = FrameChannel(a, bytes)
    receiver = FrameChannel(b, bytes, max_frame=FRAGMENT_SIZE)
    big = os.urandom(3 * FRAGMENT_SIZE + 17)
    frames = encode(big)
    (first,) = struct.unpack_from("!I", frames)
    assert first & MORE_FRAGMENTS and first & ~MORE_FRAGMENTS == FRAGMENT_SIZE
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send, big)
            assert await receiver.receive() == big
        await sender.send(b"small")
        assert await receiver.receive() == b"small"
    finally:
        sender.close()
        receiver.close()


async def test_a_message_over_the_message_limit_is_refused_while_it_arrives() -> None:
    a, b = trio.socket.socketpair()
    sender = FrameChannel(a, bytes)
    receiver = FrameChannel(b, bytes, max_message=2 * FRAGMENT_SIZE)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send, bytes(5 * FRAGMENT_SIZE))
            with pytest.raises(ProtocolError, match="message exceeds limit"):
                await receiver.receive()
            nursery.cancel_scope.cancel()
    finally:
        sender.close()
        receiver.close()
