"""Length-prefixed msgpack frames over a stream socket, with file descriptors riding along.

One channel type serves the supervisor↔worker socketpairs and the client control socket. Every
read goes through ``recvmsg`` so descriptors sent with SCM_RIGHTS are never silently dropped; they
queue in arrival order and the message that announces them takes them with :meth:`take_fds`.
"""

from __future__ import annotations

import array
import collections
import contextlib
import os
import socket
import struct
from typing import Any, TypeVar

import msgspec
import trio

from mcrelay.errors import ChannelClosed, ProtocolError

HEADER = struct.Struct("!I")
#: Set in a frame's length prefix when the frame is one fragment of a larger message and more
#: fragments follow; the length itself is in the low 31 bits.
MORE_FRAGMENTS = 1 << 31
#: Messages larger than this travel as several frames of at most this size, so no frame a
#: sender makes exceeds any receiver's frame limit (the smallest is a client's).
FRAGMENT_SIZE = 1024 * 1024
#: Largest frame on a supervisor↔worker channel.
MAX_FRAME_SIZE = 8 * 1024 * 1024
#: Largest message (all its fragments) on a supervisor↔worker channel or from the daemon to a
#: client: far above the largest rule table (`mcrelay.rules.MAX_RULES`) and its counters.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: Largest frame a control-socket client may send; larger ones close the connection.
MAX_CLIENT_FRAME_SIZE = FRAGMENT_SIZE
#: Largest message a client may send: room for a whole table in one ``config load``.
MAX_CLIENT_MESSAGE_SIZE = 32 * 1024 * 1024
#: What fragments of unfinished client messages may hold in all, across connections: two
#: whole tables at once, never 512 connections x 32 MiB.
CLIENT_REASSEMBLY_BUDGET = 2 * MAX_CLIENT_MESSAGE_SIZE
_MAX_FDS_PER_READ = 64
_READ_SIZE = 256 * 1024

T = TypeVar("T")


class ReassemblyBudget:
    """Bytes that fragments of unfinished messages may hold, shared by many channels, so
    untrusted peers together cannot make a process hold more than ``total``."""

    def __init__(self, total: int) -> None:
        self.free = total

    def take(self, size: int) -> bool:
        if size > self.free:
            return False
        self.free -= size
        return True

    def give(self, size: int) -> None:
        self.free += size


_encoder = msgspec.msgpack.Encoder()


def encode(message: object) -> bytes:
    """The frames of one message: length prefix + msgpack body, split into fragments of at
    most FRAGMENT_SIZE when it is larger."""
    body = _encoder.encode(message)
    if len(body) <= FRAGMENT_SIZE:
        return HEADER.pack(len(body)) + body
    frames: list[bytes] = []
    for start in range(0, len(body), FRAGMENT_SIZE):
        piece = body[start : start + FRAGMENT_SIZE]
        more = MORE_FRAGMENTS if start + FRAGMENT_SIZE < len(body) else 0
        frames += (HEADER.pack(len(piece) | more), piece)
    return b"".join(frames)


class FrameChannel:
    """A framed, typed message channel over a connected trio socket.

    Sends are serialised by a lock so concurrent tasks never interleave frames. Any transport
    failure (reset, EOF, closed socket) surfaces as :class:`ChannelClosed`.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        decoder_type: type[T] | Any,
        *,
        max_frame: int = MAX_FRAME_SIZE,
        max_message: int = MAX_MESSAGE_SIZE,
        budget: ReassemblyBudget | None = None,
        accept_fds: bool = True,
    ) -> None:
        self._sock = sock
        #: False for untrusted peers: descriptors they send are closed at once and end the channel.
        self._accept_fds = accept_fds
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(decoder_type)
        self._max_frame = max_frame
        self._max_message = max_message
        self._budget = budget
        self._buf = bytearray()
        #: Fragments of a message whose last frame has not arrived yet.
        self._fragments: list[bytes] = []
        self._fragments_size = 0
        self._fds: collections.deque[int] = collections.deque()
        self._send_lock = trio.Lock()
        #: A send was interrupted mid-frame: the peer can no longer find frame boundaries.
        self._torn = False
        self._closed = False

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._sock

    async def send(self, message: object, fds: list[int] | None = None) -> None:
        """Send one frame; the caller owns the deadline.

        A send cancelled after part of its frame went out leaves the stream unusable: every
        later send then fails with ChannelClosed instead of writing into the middle of a frame.
        """
        data = encode(message)
        try:
            async with self._send_lock:
                if self._torn:
                    raise ChannelClosed("channel closed: an earlier send stopped mid-frame")
                sent = 0
                try:
                    if fds:
                        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                        sent = await self._sock.sendmsg([data], ancillary)
                    else:
                        sent = await self._sock.send(data)
                    view = memoryview(data)
                    while sent < len(data):
                        sent += await self._sock.send(view[sent:])
                except BaseException:
                    if 0 < sent < len(data):
                        self._torn = True
                    raise
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise ChannelClosed(f"channel closed while sending: {exc}") from exc

    async def receive(self) -> Any:
        """Next decoded message; ProtocolError for bytes that are not a valid frame."""
        while True:
            body = await self._next_frame()
            if self._fragments:
                self._fragments.append(body)
                body = b"".join(self._fragments)
                self._drop_fragments()
            try:
                return self._decoder.decode(body)
            except msgspec.ValidationError as exc:
                raise ProtocolError(f"invalid message: {exc}") from exc
            except msgspec.DecodeError as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from exc
            except RecursionError:  # msgspec skipping a deeply nested unknown value
                raise ProtocolError("undecodable frame: nested too deeply") from None

    async def _next_frame(self) -> bytes:
        """The body of the next frame that ends a message; fragments before it are kept."""
        while True:
            if len(self._buf) >= HEADER.size:
                (prefix,) = HEADER.unpack_from(self._buf)
                length = prefix & ~MORE_FRAGMENTS
                if length > self._max_frame:
                    raise ProtocolError(f"frame of {length} bytes exceeds limit {self._max_frame}")
                if self._fragments_size + length > self._max_message:
                    raise ProtocolError(f"message exceeds limit {self._max_message} bytes")
                end = HEADER.size + length
                if len(self._buf) >= end:
                    body = bytes(self._buf[HEADER.size : end])
                    del self._buf[:end]
                    if not prefix & MORE_FRAGMENTS:
                        return body
                    if self._budget is not None and not self._budget.take(length):
                        raise ProtocolError(
                            "the daemon is receiving too many large requests at once; try again"
                        )
                    self._fragments.append(body)
                    self._fragments_size += length
                    continue
            await self._fill()

    async def _fill(self) -> None:
        try:
            data, ancdata, flags, _ = await self._sock.recvmsg(
                _READ_SIZE, socket.CMSG_SPACE(_MAX_FDS_PER_READ * 4)
            )
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise ChannelClosed(f"channel closed while receiving: {exc}") from exc
        received = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received.frombytes(payload[: len(payload) - (len(payload) % received.itemsize)])
        if received and not self._accept_fds:
            for fd in received:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise ProtocolError("file descriptors are not accepted on this channel")
        self._fds.extend(received)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("file descriptors were truncated in transit (MSG_CTRUNC)")
        if not data:
            raise ChannelClosed("peer closed the channel")
        self._buf += data

    def _drop_fragments(self) -> None:
        if self._budget is not None:
            self._budget.give(self._fragments_size)
        self._fragments, self._fragments_size = [], 0

    def take_fds(self, count: int) -> list[int]:
        """The next ``count`` descriptors received, in order; ProtocolError if they are missing."""
        if len(self._fds) < count:
            raise ProtocolError(f"expected {count} file descriptors, have {len(self._fds)}")
        return [self._fds.popleft() for _ in range(count)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_fragments()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._sock.close()
