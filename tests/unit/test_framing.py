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
from mcrelay.ipc.framing import (
    FRAGMENT_SIZE,
    HEADER,
    MORE_FRAGMENTS,
    FrameChannel,
    ReassemblyBudget,
    encode,
)

HEADER_SIZE = HEADER.size


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


async def test_channels_sharing_a_budget_cannot_hold_more_than_it_together() -> None:
    """Fragments of unfinished messages count against one budget for every client channel, so
    many connections sending large requests cannot exhaust the control worker's memory; what a
    channel held is given back when its message completes or the channel closes."""
    budget = ReassemblyBudget(3 * FRAGMENT_SIZE)
    a, b = trio.socket.socketpair()
    c, d = trio.socket.socketpair()
    first = FrameChannel(b, bytes, budget=budget)
    second = FrameChannel(d, bytes, budget=budget)
    raw_first, raw_second = a, c
    try:
        frames = encode(bytes(3 * FRAGMENT_SIZE))  # 3 full fragments + an empty last one
        fragment = HEADER_SIZE + FRAGMENT_SIZE
        async with trio.open_nursery() as nursery:
            # Two fragments (without the rest) held by the first channel...
            nursery.start_soon(_send_all, raw_first, frames[: 2 * fragment])
            nursery.start_soon(_send_all, raw_second, frames)
            nursery.start_soon(first.receive)  # waits for fragments that never come
            with trio.fail_after(5):
                while budget.free != FRAGMENT_SIZE:
                    await trio.sleep(0.01)
            # ... leave too little for the second's whole message.
            with pytest.raises(ProtocolError, match="too many large requests"):
                await second.receive()
            nursery.cancel_scope.cancel()
        second.close()
        assert budget.free == FRAGMENT_SIZE
        first.close()
        assert budget.free == 3 * FRAGMENT_SIZE
    finally:
        for channel in (first, second):
            channel.close()
        raw_first.close()
        raw_second.close()


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]
