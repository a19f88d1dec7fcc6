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
#: Largest frame on a supervisor↔worker channel (a full rule sync of ~50k rules fits).
MAX_FRAME_SIZE = 8 * 1024 * 1024
#: Largest frame a control-socket client may send; larger ones close the connection.
MAX_CLIENT_FRAME_SIZE = 1024 * 1024
_MAX_FDS_PER_READ = 64
_READ_SIZE = 256 * 1024

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


def encode(message: object) -> bytes:
    """One frame: length prefix + msgpack body."""
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


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
        accept_fds: bool = True,
    ) -> None:
        self._sock = sock
        #: False for untrusted peers: descriptors they send are closed at once and end the channel.
        self._accept_fds = accept_fds
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(decoder_type)
        self._max_frame = max_frame
        self._buf = bytearray()
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
            if len(self._buf) >= HEADER.size:
                (length,) = HEADER.unpack_from(self._buf)
                if length > self._max_frame:
                    raise ProtocolError(f"frame of {length} bytes exceeds limit {self._max_frame}")
                end = HEADER.size + length
                if len(self._buf) >= end:
                    body = bytes(self._buf[HEADER.size : end])
                    del self._buf[:end]
                    try:
                        return self._decoder.decode(body)
                    except msgspec.ValidationError as exc:
                        raise ProtocolError(f"invalid message: {exc}") from exc
                    except msgspec.DecodeError as exc:
                        raise ProtocolError(f"undecodable frame: {exc}") from exc
                    except RecursionError:  # msgspec skipping a deeply nested unknown value
                        raise ProtocolError("undecodable frame: nested too deeply") from None
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

    def take_fds(self, count: int) -> list[int]:
        """The next ``count`` descriptors received, in order; ProtocolError if they are missing."""
        if len(self._fds) < count:
            raise ProtocolError(f"expected {count} file descriptors, have {len(self._fds)}")
        return [self._fds.popleft() for _ in range(count)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._sock.close()
