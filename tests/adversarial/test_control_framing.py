"""Untrusted framing on the control socket of a live daemon: the hello, frame boundaries
(truncated, half-open, oversized, exactly the limit) and descriptors passed with a request.

As for every control-socket test, the daemon answers with a refusal or a hang-up, never a
traceback, and is healthy afterwards (``assert_healthy``).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcrelay.ipc import messages as m
from mcrelay.ipc.framing import MAX_CLIENT_FRAME_SIZE, MORE_FRAGMENTS
from tests.adversarial import (
    HEADER,
    HELLO,
    Raw,
    assert_healthy,
    assert_refused,
    control_fd_count,
    exchange,
    frame,
)
from tests.adversarial.control import TEMPLATES, TRIED, Live, fuzz

# --- the hello ---------------------------------------------------------------------------------


@fuzz(50)
@given(version=st.integers(-(2**63), 2**64 - 1).filter(lambda v: v != m.PROTOCOL_VERSION))
def test_version_mismatch(live: Live, version: int) -> None:
    d, base = live
    TRIED["hello: version mismatch"] += 1
    hello = frame(m.Hello(version=version, role="client"))
    outcome = exchange(d.socket, hello + frame({"t": "ping"}), hello=False, shut=False)
    assert_refused(outcome, protocol_error=True)
    assert f"protocol version {version}" in outcome.frames[0].error
    assert_healthy(d, base)


@pytest.mark.parametrize("role", ["supervisor", "control", "data"])
def test_hello_with_another_role(live: Live, role: str) -> None:
    """docs/architecture.md: "an unexpected role ends the channel"."""
    d, base = live
    TRIED["hello: wrong role"] += 1
    hello = frame(m.Hello(version=m.PROTOCOL_VERSION, role=role))  # type: ignore[arg-type]
    outcome = exchange(d.socket, hello + frame({"t": "ping"}), hello=False, shut=False)
    assert_refused(outcome, protocol_error=True)
    assert_healthy(d, base)


@pytest.mark.parametrize("tag", sorted(set(TEMPLATES) - {"hello"}))
def test_request_before_hello(live: Live, tag: str) -> None:
    d, base = live
    TRIED["request before hello"] += 1
    outcome = exchange(d.socket, frame(TEMPLATES[tag][0]), hello=False, shut=False)
    assert_refused(outcome, protocol_error=True)
    assert "the first frame must be a hello" in outcome.frames[0].error
    assert_healthy(d, base)


def test_second_hello_is_refused_and_the_connection_stays_usable(live: Live) -> None:
    d, base = live
    TRIED["second hello"] += 1
    conn = Raw(d.socket)
    try:
        conn.send(HELLO + HELLO + frame({"t": "ping"}))
        hello, again, pong = conn.read_frames(3)
        assert isinstance(hello, m.Hello)
        assert again == m.Reply(ok=False, error="hello was already exchanged")
        assert isinstance(pong, m.Reply) and pong.ok
    finally:
        conn.close()
    assert_healthy(d, base)


# --- frame boundaries --------------------------------------------------------------------------


@fuzz(100)
@given(
    length=st.integers(1, MAX_CLIENT_FRAME_SIZE),
    data=st.data(),
    hello=st.booleans(),
    half_close=st.booleans(),
)
def test_truncated_frames(
    live: Live, length: int, data: st.DataObject, hello: bool, half_close: bool
) -> None:
    """The header promises N bytes, fewer come, then the client half-closes or goes away."""
    d, base = live
    TRIED["truncated frame" + (" (half-open)" if half_close else " (closed)")] += 1
    sent = data.draw(st.binary(max_size=min(length - 1, 2048)), label="body")
    payload = HEADER.pack(length) + sent
    if half_close:
        outcome = exchange(d.socket, payload, hello=hello)  # SHUT_WR, then read to EOF
        assert outcome.closed and outcome.frames == [], outcome.frames
    else:
        conn = Raw(d.socket)
        if hello:
            conn.send(HELLO)
            conn.read_frames(1)
        conn.send(payload)
        conn.close()
    assert_healthy(d, base)


@fuzz(60)
@given(data=st.data(), hello=st.booleans())
def test_half_open_after_a_partial_request(live: Live, data: st.DataObject, hello: bool) -> None:
    """A valid request cut anywhere, then shutdown(SHUT_WR): no answer, connection closed."""
    d, base = live
    TRIED["half-open partial request"] += 1
    tag = data.draw(st.sampled_from(sorted(set(TEMPLATES) - {"hello"})), label="tag")
    whole = frame(TEMPLATES[tag][0])
    cut = data.draw(st.integers(1, len(whole) - 1), label="cut")
    outcome = exchange(d.socket, whole[:cut], hello=hello)
    assert outcome.closed and outcome.frames == [] and outcome.raw == b""
    assert_healthy(d, base)


@fuzz(50)
@given(
    length=st.integers(MAX_CLIENT_FRAME_SIZE + 1, MORE_FRAGMENTS - 1),
    more=st.booleans(),
    body=st.binary(max_size=64),
    hello=st.booleans(),
)
def test_oversized_frames_are_refused_before_the_body(
    live: Live, length: int, more: bool, body: bytes, hello: bool
) -> None:
    """Only the header (and a few bytes) are sent: the refusal cannot have waited for the body.
    The length's top bit says whether more fragments follow; either way the length is checked."""
    d, base = live
    TRIED["oversized frame"] += 1
    prefix = HEADER.pack(length | (MORE_FRAGMENTS if more else 0))
    outcome = exchange(d.socket, prefix + body, hello=hello, shut=False)
    assert_refused(outcome, protocol_error=True)
    assert f"frame of {length} bytes exceeds limit {MAX_CLIENT_FRAME_SIZE}" in (
        outcome.frames[0].error or ""
    )
    assert_healthy(d, base)


def _remove_request_of_size(size: int) -> bytes:
    """A frame whose body is exactly ``size`` bytes: a remove of a long, unknown id."""
    probe = 100_000  # str32 header from here on, so the body grows one byte per character
    overhead = len(msgspec.msgpack.encode({"t": "remove", "id": "x" * probe})) - probe
    body = msgspec.msgpack.encode({"t": "remove", "id": "x" * (size - overhead)})
    assert len(body) == size
    return HEADER.pack(size) + body


def test_frame_of_exactly_the_limit_is_read_one_more_byte_is_not(live: Live) -> None:
    d, base = live
    TRIED["frame at the size limit"] += 2
    outcome = exchange(d.socket, _remove_request_of_size(MAX_CLIENT_FRAME_SIZE))
    assert_refused(outcome)
    assert len(outcome.frames) == 1 and "no rule with id" in (outcome.frames[0].error or "")
    outcome = exchange(d.socket, _remove_request_of_size(MAX_CLIENT_FRAME_SIZE + 1), shut=False)
    assert_refused(outcome, protocol_error=True)
    assert "exceeds limit" in (outcome.frames[0].error or "")
    assert_healthy(d, base, fds=True)


# --- descriptors -------------------------------------------------------------------------------


def test_file_descriptors_are_refused_and_closed(live: Live) -> None:
    """SCM_RIGHTS on the control socket: they used to pile up in the control worker (one client
    could exhaust its descriptor table, and the next accept() crashed the worker)."""
    d, base = live
    control_pid = base.workers["control"][0]
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        for hello in (True, False):
            TRIED["file descriptors attached"] += 1
            conn = Raw(d.socket)
            try:
                if hello:
                    conn.send(HELLO)
                    conn.read_frames(1)
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [null] * 60))]
                payload = frame({"t": "ping"}) if hello else HELLO
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    for _ in range(10):
                        conn.sock.sendmsg([payload], rights)
                outcome = conn.read_to_eof()
            finally:
                conn.close()
            assert_refused(outcome, protocol_error=True)
            assert "file descriptors are not accepted" in (outcome.frames[0].error or "")
            assert control_fd_count(control_pid) < base.control_fds + 60
    finally:
        os.close(null)
    assert_healthy(d, base, fds=True)
