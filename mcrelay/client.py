"""Talking to a running daemon over its control socket (used by the CLI and by tests).

Replies are decoded here, once, into the request's result type (`mcrelay.ipc.replies`): callers
get structs, never dictionaries. `call` gives the same result as plain data in its public shape
(what ``--json`` prints), for callers that only pass it on.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, TypeVar

import trio

from mcrelay.errors import ChannelClosed, McrelayError, ProtocolError
from mcrelay.ipc import messages as m
from mcrelay.ipc import replies
from mcrelay.ipc.framing import FrameChannel

R = TypeVar("R", bound=replies.Result)


class DaemonError(McrelayError):
    """The daemon refused the request; the message is its reason."""


async def request(path: Path, req: m.Request[R]) -> R:
    """Send one request and return its result; the caller owns the timeout."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise McrelayError(f"mcrelay is not running (no daemon on {path})") from None
    except PermissionError:
        sock.close()
        raise McrelayError(f"permission denied on {path}") from None
    except OSError as exc:  # e.g. a path too long for AF_UNIX
        sock.close()
        raise McrelayError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    except BaseException:  # cancelled while connecting
        sock.close()
        raise
    channel = FrameChannel(sock, m.ServerToClient)
    try:
        await channel.send(m.Hello(version=m.PROTOCOL_VERSION, role="client"))
        hello = await channel.receive()
        if isinstance(hello, m.Reply):
            raise DaemonError(hello.error or "the daemon refused the connection")
        await channel.send(req)
        reply = await channel.receive()
    except ChannelClosed:
        raise McrelayError(f"the daemon on {path} closed the connection") from None
    except ProtocolError as exc:
        raise McrelayError(f"unexpected answer from the daemon on {path}: {exc}") from None
    finally:
        channel.close()
    if not isinstance(reply, m.Reply):
        raise McrelayError(f"unexpected answer from the daemon on {path}")
    if not reply.ok:
        raise DaemonError(reply.error or "request failed")
    try:
        return m.result_of(req, reply)
    except ProtocolError as exc:
        raise McrelayError(f"unexpected answer from the daemon on {path}: {exc}") from None


def ask(path: Path, req: m.Request[R], timeout: float = 20.0) -> R:
    """Blocking form for the CLI."""

    async def _run() -> R:
        with trio.fail_after(timeout):
            return await request(path, req)

    try:
        return trio.run(_run)
    except trio.TooSlowError:
        raise McrelayError(f"the daemon on {path} did not answer within {timeout:.0f} s") from None


def call(path: Path, req: m.Request[Any], timeout: float = 20.0) -> Any:
    """`ask`, with the result as plain data in its public shape (`replies.public`)."""
    return replies.public(ask(path, req, timeout))
