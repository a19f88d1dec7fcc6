"""Clients of the control socket that stall: silent, half-way through a frame, or never reading
their replies; none holds up the others. Last of the control-socket tests, it also checks that
every connection they opened has been closed by the control worker.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from mcrelay.ipc import messages as m
from mcrelay.worker.control import CLIENT_SEND_TIMEOUT
from tests.adversarial import (
    HEADER,
    HELLO,
    Raw,
    assert_healthy,
    call,
    frame,
)
from tests.adversarial.control import TRIED, Live
from tests.lab.daemon import wait_for

# --- clients that stall ------------------------------------------------------------------------


def _timed_ping(path: Path) -> float:
    t0 = time.monotonic()
    assert call(path, m.Ping(), timeout=5)["pong"] is True
    return time.monotonic() - t0


def test_clients_that_never_send_do_not_hold_up_others(live: Live) -> None:
    """Not waiting for the idle timeout (30 s): while idle clients sit there, others are served."""
    d, base = live
    idle: list[Raw] = []
    try:
        for _ in range(20):
            idle.append(Raw(d.socket))  # connected, nothing sent
        for _ in range(20):
            conn = Raw(d.socket)
            conn.send(HELLO)  # greeted, then silent
            idle.append(conn)
        for _ in range(10):
            conn = Raw(d.socket)
            conn.send(HELLO + HEADER.pack(100) + b"\x82")  # stuck in the middle of a frame
            idle.append(conn)
        TRIED["idle clients"] += len(idle)
        for _ in range(5):
            assert _timed_ping(d.socket) < 2.0
            assert_healthy(d, base)
        assert not any(c.peer_closed() for c in idle)  # well within their 30 s
    finally:
        for conn in idle:
            conn.close()
    assert_healthy(d, base, fds=True)


def test_client_that_never_reads_its_replies(live: Live) -> None:
    """Requests pile up unread: the server stops on that client alone, then drops it after
    CLIENT_SEND_TIMEOUT (5 s)."""
    d, base = live
    TRIED["client that never reads"] += 1
    greedy = Raw(d.socket)
    try:
        greedy.send(HELLO)
        greedy.read_frames(1)
        greedy.sock.setblocking(False)
        flood = frame({"t": "workers"}) * 20_000
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < len(flood):
                sent += greedy.sock.send(flood[sent:])
        # Meanwhile everyone else is served promptly.
        for _ in range(5):
            assert _timed_ping(d.socket) < 2.0
        assert_healthy(d, base)
        assert not greedy.peer_closed()
        wait_for(greedy.peer_closed, timeout=CLIENT_SEND_TIMEOUT + 3)
    finally:
        greedy.close()
    assert_healthy(d, base, fds=True)


def test_no_descriptor_leak_after_everything(live: Live) -> None:
    """Last of the control-socket tests: every connection they opened has been closed by the
    control worker too."""
    d, base = live
    assert_healthy(d, base, fds=True)
    assert base.checks > 0
