"""The control-plane worker: the only process that parses untrusted client input.

It owns no state. Every client frame is decoded against the request schema and validated here;
only well-formed requests reach the supervisor, as ControlRequest, and its reply goes back.
A client that stalls, floods or sends garbage costs only its own connection.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
from typing import Any

import trio
import trio_util

from mcrelay import rules
from mcrelay.errors import ChannelClosed, McrelayError, ProtocolError
from mcrelay.ipc import messages as m
from mcrelay.ipc.framing import (
    CLIENT_REASSEMBLY_BUDGET,
    FRAGMENT_SIZE,
    MAX_CLIENT_FRAME_SIZE,
    MAX_CLIENT_MESSAGE_SIZE,
    FrameChannel,
    ReassemblyBudget,
)
from mcrelay.system.accept import accept_retrying
from mcrelay.system.logs import check_log_level
from mcrelay.system.peers import Role, denied, peer_credentials, request_refusal, role_of

log = logging.getLogger("mcrelay.control")

#: A connected client that sends nothing for this long is disconnected.
CLIENT_IDLE_TIMEOUT = 30.0
#: A client that does not read its reply within this long is disconnected.
CLIENT_SEND_TIMEOUT = 5.0
#: How long a request may wait for the supervisor (rule changes wait for worker acks).
REQUEST_TIMEOUT = 15.0
MAX_CLIENTS = 512
TIMED_OUT = "the supervisor did not answer in time"
CHANGE_MAY_BE_DONE = "if the change had begun it is completed: `mcrelay rules` shows whether it was"
#: At most this many connections per uid, except root's and the supervisor's user's.
MAX_CLIENTS_PER_UID = 64
#: Connections only root and the supervisor's user may take: others together get the rest, so
#: no group member (or several) can lock root out by holding connections open.
ADMIN_RESERVED = 16
#: Roles that may change the table, and so send a whole table in one request.
_WRITERS = (Role.ADMIN, Role.OPERATOR)


class ControlWorker:
    def __init__(self, channel: FrameChannel) -> None:
        self._channel = channel
        self._nursery: trio.Nursery | None = None
        self._pending: dict[int, trio.MemorySendChannel[m.Reply]] = {}
        self._ids = itertools.count(1)
        self._owner_uid = 0
        self._allowed_gid: int | None = None
        self._read_gid: int | None = None
        self._clients = 0
        #: Open connections per peer uid, and the uids already logged as over their cap.
        self._per_uid: dict[int, int] = {}
        self._capped: set[int] = set()
        self._reassembly = ReassemblyBudget(CLIENT_REASSEMBLY_BUDGET)
        #: Requests taken from clients and not yet answered; a stopping worker answers them first.
        self._inflight = trio_util.AsyncValue(0)

    async def run(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def close(self) -> None:
        return None

    async def handle(self, message: Any) -> None:
        match message:
            case m.ListenSocket(owner_uid=owner_uid, allowed_gid=allowed_gid, read_gid=read_gid):
                self._owner_uid, self._allowed_gid = owner_uid, allowed_gid
                self._read_gid = read_gid
                (fd,) = self._channel.take_fds(1)
                listener = socket.socket(fileno=fd)
                listener.setblocking(False)
                assert self._nursery is not None
                self._nursery.start_soon(self._serve, trio.socket.from_stdlib_socket(listener))
            case m.ControlReply(req_id=req_id, reply=reply):
                waiter = self._pending.pop(req_id, None)
                if waiter is not None:
                    waiter.send_nowait(reply)
            case _:
                log.warning("unexpected %s from the supervisor", type(message).__name__)

    async def _serve(self, listener: trio.socket.SocketType) -> None:
        log.info("serving the control socket")
        async with trio.open_nursery() as nursery:
            while True:
                # Shortages (EMFILE, ENOMEM ...) pause accepting instead of ending the worker.
                conn, _ = await accept_retrying(listener.accept, log, "cannot accept clients")
                try:
                    pid, uid, gid = peer_credentials(conn)
                except OSError:
                    conn.close()
                    continue
                over = self._over_cap(uid)
                if over is not None:
                    conn.close()
                    if uid not in self._capped:
                        self._capped.add(uid)
                        log.warning("refused a client: %s", over)
                    continue
                # Counted here, not in the task: clients accepted before their tasks run count.
                self._clients += 1
                self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
                nursery.start_soon(self._client, conn, pid, uid, gid)

    def _over_cap(self, uid: int) -> str | None:
        """Why a new connection from ``uid`` is one too many, or None."""
        if self._clients >= MAX_CLIENTS:
            return f"{MAX_CLIENTS} clients already connected"
        if uid in (0, self._owner_uid):
            return None
        if self._clients >= MAX_CLIENTS - ADMIN_RESERVED:
            return (
                f"uid {uid}: {MAX_CLIENTS - ADMIN_RESERVED} clients already connected "
                f"(the last {ADMIN_RESERVED} of {MAX_CLIENTS} are kept for root)"
            )
        if self._per_uid.get(uid, 0) >= MAX_CLIENTS_PER_UID:
            return f"uid {uid} already holds {MAX_CLIENTS_PER_UID} connections (its limit)"
        return None

    async def _client(self, conn: trio.socket.SocketType, pid: int, uid: int, gid: int) -> None:
        role = role_of(
            pid,
            uid,
            gid,
            owner_uid=self._owner_uid,
            allowed_gid=self._allowed_gid,
            read_gid=self._read_gid,
        )
        channel = FrameChannel(
            conn,
            m.ClientToServer,
            max_frame=MAX_CLIENT_FRAME_SIZE,
            # Readers and refused peers only ever need small requests: one frame.
            max_message=MAX_CLIENT_MESSAGE_SIZE if role in _WRITERS else FRAGMENT_SIZE,
            budget=self._reassembly,
            accept_fds=False,
        )
        try:
            if role is None:
                reason = denied(uid, self._allowed_gid, self._read_gid)
                log.warning("refused a client: %s", reason)
                with trio.move_on_after(CLIENT_SEND_TIMEOUT):
                    # Take its hello first, so the refusal is read rather than lost to a reset.
                    with contextlib.suppress(ProtocolError):
                        await channel.receive()
                    await channel.send(m.Reply(ok=False, error=reason))
                return
            await self._converse(channel, role, uid)
        except (ChannelClosed, trio.TooSlowError):
            pass
        except ProtocolError as exc:
            # Say why, once, then hang up: the stream can no longer be trusted.
            with trio.move_on_after(CLIENT_SEND_TIMEOUT):
                with contextlib.suppress(ChannelClosed):
                    await channel.send(m.Reply(ok=False, error=f"protocol error: {exc}"))
        except Exception:
            # A bug, but one client's input must never take the control plane down with it.
            log.exception("client connection failed")
        finally:
            self._clients -= 1
            left = self._per_uid[uid] - 1
            if left:
                self._per_uid[uid] = left
            else:
                del self._per_uid[uid]
            self._capped.discard(uid)
            channel.close()

    async def _converse(self, channel: FrameChannel, role: Role, uid: int) -> None:
        with trio.fail_after(CLIENT_IDLE_TIMEOUT):
            hello = await channel.receive()
        if not isinstance(hello, m.Hello):
            raise ProtocolError("the first frame must be a hello")
        if hello.version != m.PROTOCOL_VERSION:
            raise ProtocolError(
                f"client speaks protocol version {hello.version}, this daemon speaks "
                f"{m.PROTOCOL_VERSION}"
            )
        if hello.role != "client":
            raise ProtocolError(f"a {hello.role!r} hello on the control socket (expected 'client')")
        with trio.fail_after(CLIENT_SEND_TIMEOUT):
            await channel.send(m.Hello(version=m.PROTOCOL_VERSION, role="control"))
        while True:
            with trio.fail_after(CLIENT_IDLE_TIMEOUT):
                request = await channel.receive()
            self._inflight.value += 1
            try:
                refused = request_refusal(role, uid, request, self._read_gid)
                if refused is not None:
                    reply = m.Reply(ok=False, error=refused)
                else:
                    reply = await self._answer(request)
                with trio.fail_after(CLIENT_SEND_TIMEOUT):
                    await channel.send(reply)
            finally:
                self._inflight.value -= 1

    async def drain(self) -> None:
        """Until every request already taken has been answered (the caller bounds the wait)."""
        await self._inflight.wait_value(0)

    async def _answer(self, request: object) -> m.Reply:
        if isinstance(request, m.Hello):
            return m.Reply(ok=False, error="hello was already exchanged")
        try:
            _validate(request)
        except McrelayError as exc:
            return m.Reply(ok=False, error=str(exc))
        req_id = next(self._ids)
        send, receive = trio.open_memory_channel[m.Reply](1)
        self._pending[req_id] = send
        try:
            await self._channel.send(m.ControlRequest(req_id=req_id, request=request))  # type: ignore[arg-type]
            with trio.move_on_after(REQUEST_TIMEOUT):
                return await receive.receive()
            if isinstance(request, (m.AddRule, m.RemoveRule, m.ReplaceRules)):
                # The supervisor refuses a change it cannot begin in time; one it began is
                # finished everywhere, so only "begun or not" is unknown here.
                return m.Reply(ok=False, error=f"{TIMED_OUT}; {CHANGE_MAY_BE_DONE}")
            return m.Reply(ok=False, error=TIMED_OUT)
        finally:
            self._pending.pop(req_id, None)


def _validate(request: object) -> None:
    """Everything that can be checked without the rule table, so the supervisor sees only sense."""
    match request:
        case m.AddRule(rule=rule):
            rules.validate(rule)
        case m.ReplaceRules(rules=new_rules):
            for rule in new_rules:
                rules.validate(rule)
        case m.LogLevel(level=str() as level):
            check_log_level(level)
        case m.RemoveRule(id=rule_id) | m.RestartWorker(id=rule_id) if not rule_id:
            raise McrelayError("an id is required")
