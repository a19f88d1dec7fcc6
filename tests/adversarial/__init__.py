"""Adversarial tests: untrusted input against a live daemon, many clients at once, config fuzz.

Shared helpers: raw AF_UNIX connections that speak (or break) the client protocol byte by byte,
and the health check run after every adversarial input (the daemon answers, no worker was
replaced, the rule table is what it was, nothing logged a traceback).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from mcrelay import client
from mcrelay.ipc import messages as m
from mcrelay.ipc.framing import MORE_FRAGMENTS
from mcrelay.rules import Output, Rule, RuleInput
from tests.lab.daemon import Daemon, daemon, wait_for

HEADER = struct.Struct("!I")
_server_decoder = msgspec.msgpack.Decoder(m.ServerToClient)

#: Rules present during the whole module: "rules unchanged" then means something.
BASELINE_RULES = (
    m.AddRule(
        rule=Rule(
            id="base-1",
            input=RuleInput(interface="in0", group="239.1.1.1", port=5000),
            outputs=(Output(group="239.9.9.1", port=6000, interface="out0"),),
        )
    ),
    m.AddRule(
        rule=Rule(
            id="base-2",
            input=RuleInput(interface="in0", group="10.1.1.2", port=5001, source="10.0.0.5"),
            outputs=(Output(group="10.2.2.2", port=6001, interface="out0", ttl=3),),
        )
    ),
)


def frame(message: Any) -> bytes:
    """A frame around any msgpack-encodable value (not just valid messages)."""
    body = msgspec.msgpack.encode(message)
    return HEADER.pack(len(body)) + body


HELLO = frame(m.Hello(version=m.PROTOCOL_VERSION, role="client"))


def call(path: Path, request: m.ClientRequest, timeout: float = 10.0) -> Any:
    return client.call(path, request, timeout=timeout)


@dataclass
class Outcome:
    """What the server sent on one raw connection, and whether it closed the connection."""

    raw: bytes
    frames: list[Any]
    closed: bool
    tail: bytes = b""  # bytes after the last whole frame (must be empty)

    @property
    def replies(self) -> list[m.Reply]:
        return [f for f in self.frames if isinstance(f, m.Reply)]


def split_frames(raw: bytes) -> tuple[list[Any], bytes]:
    """The whole messages in ``raw`` (a large one comes as fragments) and the bytes after."""
    frames = []
    pos = done = 0
    fragments: list[bytes] = []
    while len(raw) - pos >= HEADER.size:
        (prefix,) = HEADER.unpack_from(raw, pos)
        length = prefix & ~MORE_FRAGMENTS
        if len(raw) - pos - HEADER.size < length:
            break
        fragments.append(raw[pos + HEADER.size : pos + HEADER.size + length])
        pos += HEADER.size + length
        if not prefix & MORE_FRAGMENTS:
            frames.append(_server_decoder.decode(b"".join(fragments)))  # every answer decodes
            fragments, done = [], pos
    return frames, raw[done:]


class Raw:
    """One client connection driven by hand."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buf = b""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                return
            except BlockingIOError:  # AF_UNIX: the listen backlog is full, try again
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.005)

    def send(self, data: bytes) -> bool:
        """False when the server hung up first (which is an allowed answer to bad input)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def shut_wr(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def read_frames(self, count: int, timeout: float = 5.0) -> list[Any]:
        """The next ``count`` frames (fail on EOF or at the deadline); the rest stays buffered."""
        deadline = time.monotonic() + timeout
        frames: list[Any] = []
        while len(frames) < count:
            if len(self.buf) >= HEADER.size:
                (length,) = HEADER.unpack_from(self.buf)
                end = HEADER.size + length
                if len(self.buf) >= end:
                    frames.append(_server_decoder.decode(self.buf[HEADER.size : end]))
                    self.buf = self.buf[end:]
                    continue
            left = deadline - time.monotonic()
            assert left > 0, f"no answer within {timeout} s (have {frames})"
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            assert data, f"server closed after {frames}"
            self.buf += data
        return frames

    def read_to_eof(self, timeout: float = 5.0) -> Outcome:
        """Everything the server sends until it closes; fails if it does not close in time."""
        deadline = time.monotonic() + timeout
        raw = self.buf
        closed = False
        while not closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                break
            closed = not data
            raw += data
        self.buf = b""
        frames, tail = split_frames(raw)
        return Outcome(raw=raw, frames=frames, closed=closed, tail=tail)

    def peer_closed(self) -> bool:
        """True once the server has closed its end, without reading what is queued."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in poller.poll(0))

    def close(self) -> None:
        self.sock.close()


def exchange(
    path: Path, payload: bytes, *, hello: bool = True, shut: bool = True, timeout: float = 5.0
) -> Outcome:
    """Connect, optionally greet, send ``payload``, optionally half-close, read until EOF.

    With ``shut`` the server sees end of input after the payload, so it must close the
    connection once it has answered whatever was complete; without it the server must close by
    itself (protocol errors).
    """
    conn = Raw(path, timeout)
    try:
        if hello:
            conn.send(HELLO)
            (greeting,) = conn.read_frames(1)
            assert isinstance(greeting, m.Hello), greeting
            assert greeting.role == "control"
        conn.send(payload)
        if shut:
            conn.shut_wr()
        return conn.read_to_eof(timeout)
    finally:
        conn.close()


def assert_refused(outcome: Outcome, *, protocol_error: bool = False) -> None:
    """A bad input gets error replies (decodable, no traceback) and/or a closed connection."""
    assert b"Traceback" not in outcome.raw
    assert outcome.tail == b"", f"partial frame from the server: {outcome.tail!r}"
    assert outcome.closed, f"server did not close the connection; sent {outcome.frames}"
    for f in outcome.frames:
        assert isinstance(f, m.Reply), f"unexpected {f!r}"
        assert f.ok is False and isinstance(f.error, str) and f.error, f
        assert "Traceback" not in f.error
    if protocol_error:
        assert len(outcome.frames) == 1, outcome.frames
        error = outcome.frames[0].error
        assert error.startswith("protocol error: "), error


def control_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Baseline:
    """The daemon as it must stay: worker processes, restart counts, rules, open descriptors."""

    workers: dict[str, tuple[int, int]]
    rules: Any
    control_fds: int
    log_size: int
    checks: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def workers_of(path: Path) -> dict[str, tuple[int, int]]:
    found = call(path, m.ListWorkers())
    assert all(w["state"] == "running" for w in found), found
    return {w["id"]: (w["pid"], w["restarts"]) for w in found}


def take_baseline(d: Daemon) -> Baseline:
    d.wait_running()
    workers = workers_of(d.socket)
    d.seen_worker_pids.update(pid for pid, _ in workers.values())
    control_pid = workers["control"][0]
    return Baseline(
        workers=workers,
        rules=call(d.socket, m.ListRules()),
        control_fds=control_fd_count(control_pid),
        log_size=d.log.stat().st_size,
    )


def assert_healthy(d: Daemon, base: Baseline, *, fds: bool = False) -> None:
    """After adversarial input: it answers, nothing restarted, rules unchanged, no traceback.

    ``fds``: also wait until the control worker holds no more descriptors than at the start
    (every connection it was given is closed again).
    """
    base.checks += 1
    pong = call(d.socket, m.Ping(), timeout=10)
    assert pong == {"pong": True, "protocol": m.PROTOCOL_VERSION}
    assert workers_of(d.socket) == base.workers, d.log.read_text()[-3000:]
    assert call(d.socket, m.ListRules()) == base.rules
    with open(d.log, "rb") as log:
        log.seek(base.log_size)
        new_log = log.read()
    assert b"Traceback" not in new_log, new_log.decode(errors="replace")[-3000:]
    if fds:
        control_pid = base.workers["control"][0]
        wait_for(lambda: control_fd_count(control_pid) <= base.control_fds, timeout=5)


@contextlib.contextmanager
def live_daemon(tmp: Path, *args: str) -> Iterator[tuple[Daemon, Baseline]]:
    """A real supervisor with one data worker and the baseline rules; ended by PID."""
    with daemon(tmp, "--num-workers", "1", *args) as d:
        d.wait_running()
        for add in BASELINE_RULES:
            call(d.socket, add)
        yield d, take_baseline(d)
