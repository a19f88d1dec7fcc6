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
from mcrelay.ipc.framing import FrameChannel, encode


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
