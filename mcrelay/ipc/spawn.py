"""The supervisor <-> spawner protocol: one msgpack message per SOCK_SEQPACKET datagram.

The supervisor asks for a worker (:class:`Spawn`, with the worker's socketpair end as SCM_RIGHTS);
the spawner answers :class:`Spawned` (with a pidfd of the child, opened before anyone could reap
it, so it cannot name a recycled pid) or :class:`SpawnFailed`, and later reports each child's
:class:`Exited` status (only the spawner, the parent, can reap it).
"""

from __future__ import annotations

import array
import socket

import msgspec

from mcrelay.errors import ChannelClosed, ProtocolError

#: Far above any message; a datagram this big is a protocol error.
MAX_MESSAGE = 65536


class Ready(msgspec.Struct, tag=True):
    """The spawner's first message: it runs, its code is loaded, the drop was tried."""

    pid: int
    #: Why workers cannot drop their privileges (None: they can).
    drop_error: str | None = None


class Spawn(msgspec.Struct, tag=True):
    #: Echoed in the reply: a reply to a request whose sender gave up is recognised as such.
    id: int
    kind: str
    worker_id: str
    cpus: tuple[int, ...] = ()
    faults: tuple[str, ...] = ()


class Spawned(msgspec.Struct, tag=True):
    id: int
    pid: int


class SpawnFailed(msgspec.Struct, tag=True):
    id: int
    error: str


class Exited(msgspec.Struct, tag=True):
    pid: int
    #: As subprocess reports it: the exit code, or -N when killed by signal N.
    status: int


ToSpawner = Spawn
FromSpawner = Ready | Spawned | SpawnFailed | Exited

_encoder = msgspec.msgpack.Encoder()
_to_spawner = msgspec.msgpack.Decoder(ToSpawner)
_from_spawner = msgspec.msgpack.Decoder(FromSpawner)


def encode(message: ToSpawner | FromSpawner) -> bytes:
    return _encoder.encode(message)


def decode_request(data: bytes) -> ToSpawner:
    try:
        return _to_spawner.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad spawner request: {exc}") from None


def decode_reply(data: bytes) -> FromSpawner:
    try:
        return _from_spawner.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad spawner message: {exc}") from None


def unpack(
    data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int
) -> tuple[bytes, list[int]]:
    """The payload and the descriptors of one received datagram (also on EOF or truncation)."""
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        _close_all(fds)
        raise ChannelClosed("the other end closed the spawner socket")
    if flags & socket.MSG_TRUNC:
        _close_all(fds)
        raise ProtocolError("truncated spawner message")
    if flags & socket.MSG_CTRUNC:
        _close_all(fds)
        raise DescriptorsLost(data)
    return data, list(fds)


class DescriptorsLost(ProtocolError):
    """The message arrived whole, but not its descriptors: the receiver had no room for them
    (out of descriptors). The message is in ``data``; the stream is still in step."""

    def __init__(self, data: bytes) -> None:
        super().__init__("descriptors lost in transit (the receiver is out of descriptors)")
        self.data = data


def ancillary_space(nfds: int) -> int:
    return socket.CMSG_SPACE(nfds * array.array("i").itemsize)


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def _close_all(fds: array.array[int]) -> None:
    import os

    for fd in fds:
        os.close(fd)
