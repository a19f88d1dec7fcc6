"""sd_notify against a fake NOTIFY_SOCKET: a temporary AF_UNIX datagram socket, path or abstract.

Exact datagrams are asserted; the watchdog loop runs under ``autojump_clock``, so its times are
exact and nothing sleeps for real.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from mcrelay.system.notify import ENVIRONMENT_KEYS, SystemdNotifier, monotonic_usec

WATCHDOG_USEC = 10_000_000  # WatchdogSec=10s: a ping every 5 s


class Receiver:
    """The fake systemd end: a bound datagram socket and the NOTIFY_SOCKET value naming it."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name

    def messages(self) -> list[bytes]:
        """Every datagram queued so far (sends on AF_UNIX are delivered synchronously)."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 108 bytes a socket path may have.
    with tempfile.TemporaryDirectory(prefix="mcrelay-notify-") as d:
        yield Path(d)


def bind_receiver(name: str) -> Receiver:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:] if name.startswith("@") else name)
    sock.setblocking(False)
    return Receiver(sock, name)


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[Receiver]:
    if request.param == "path":
        name = str(short_dir / "notify")
    else:
        name = f"@mcrelay-test-notify-{os.getpid()}-{os.urandom(4).hex()}"
    r = bind_receiver(name)
    yield r
    r.sock.close()


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def logs() -> Iterator[ListHandler]:
    # Our own handler: the "mcrelay" logger may have been set not to propagate by an earlier test.
    logger = logging.getLogger("mcrelay.systemd")
    handler = ListHandler()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


_open: list[SystemdNotifier] = []


@pytest.fixture(autouse=True)
def _close_notifiers() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def from_environment(environ: dict[str, str] | None = None) -> SystemdNotifier:
    """``SystemdNotifier.from_environment``, closed when the test ends."""
    notifier = SystemdNotifier.from_environment(environ)
    _open.append(notifier)
    return notifier


def notifier_for(name: str, watchdog_usec: int | None = None) -> SystemdNotifier:
    env = {"NOTIFY_SOCKET": name}
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return from_environment(env)


# --- environment ----------------------------------------------------------------------------


def test_environment_is_popped_so_children_do_not_inherit_it(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.name)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with SystemdNotifier.from_environment() as notifier:
        for key in ENVIRONMENT_KEYS:
            assert key not in os.environ
        assert notifier.enabled
        assert notifier.watchdog_interval == 5.0
        assert notifier._sock is not None
        assert not notifier._sock.get_inheritable()
        assert notifier.ready()
    assert receiver.messages() == [b"READY=1"]


def test_popped_even_when_unusable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    notifier = from_environment()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    for key in ENVIRONMENT_KEYS:
        assert key not in os.environ


async def test_without_notify_socket_everything_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))  # meaningless without a socket
    notifier = from_environment()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.reloading()
    assert not notifier.reloaded()
    assert not notifier.stopping()
    assert not notifier.watchdog()
    start = trio.current_time()
    await notifier.watchdog_loop()  # returns at once
    assert trio.current_time() == start
    assert "WATCHDOG_USEC" not in os.environ


# --- messages ---------------------------------------------------------------------------------


def test_exact_messages(receiver: Receiver) -> None:
    notifier = notifier_for(receiver.name, WATCHDOG_USEC)
    assert notifier.status("starting 4 workers")
    assert notifier.ready("5 workers running, 12 rules")
    assert notifier.watchdog()
    before = monotonic_usec()
    assert notifier.reloading()
    after = monotonic_usec()
    assert notifier.reloaded("5 workers running, 13 rules")
    assert notifier.stopping()
    got = receiver.messages()
    assert got[:3] == [
        b"STATUS=starting 4 workers",
        b"READY=1\nSTATUS=5 workers running, 12 rules",
        b"WATCHDOG=1",
    ]
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", got[3])
    assert match
    assert before <= int(match[1]) <= after
    assert got[4:] == [b"READY=1\nSTATUS=5 workers running, 13 rules", b"STOPPING=1"]
    notifier.close()


def test_monotonic_usec_is_clock_monotonic() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    value = monotonic_usec()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= value <= after


def test_status_is_one_line(receiver: Receiver) -> None:
    notifier = notifier_for(receiver.name)
    notifier.status("first\nsecond\r\nthird")
    notifier.stopping("SIGTERM\nbye")
    assert receiver.messages() == [b"STATUS=first second third", b"STOPPING=1\nSTATUS=SIGTERM bye"]


def test_reload_during_startup_does_not_announce_readiness(receiver: Receiver) -> None:
    notifier = notifier_for(receiver.name)
    notifier.reloading()
    notifier.reloaded("3 rules")
    notifier.reloaded()  # nothing to say
    got = receiver.messages()
    assert len(got) == 2
    assert got[0].startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert got[1] == b"STATUS=3 rules"


# --- watchdog ---------------------------------------------------------------------------------


async def collect_pings(receiver: Receiver, count: int) -> list[float]:
    """Run the watchdog loop until ``count`` pings arrived; their times relative to the start."""
    notifier = notifier_for(receiver.name, WATCHDOG_USEC)
    rsock = trio.socket.from_stdlib_socket(receiver.sock)
    start = trio.current_time()
    times: list[float] = []
    with trio.fail_after(600):  # virtual seconds
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.watchdog_loop)
            while len(times) < count:
                assert await rsock.recv(4096) == b"WATCHDOG=1"
                times.append(round(trio.current_time() - start, 6))
            nursery.cancel_scope.cancel()
    return times


async def test_watchdog_pings_at_half_the_interval(
    receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    assert await collect_pings(receiver, 5) == [0.0, 5.0, 10.0, 15.0, 20.0]


async def test_watchdog_pid_of_this_process(
    receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    env = {
        "NOTIFY_SOCKET": receiver.name,
        "WATCHDOG_USEC": "3000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    notifier = from_environment(env)
    assert env == {}
    assert notifier.watchdog_interval == 1.5
    assert notifier.watchdog()
    assert receiver.messages() == [b"WATCHDOG=1"]


async def test_watchdog_pid_of_another_process_means_no_pings(
    receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    env = {
        "NOTIFY_SOCKET": receiver.name,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    notifier = from_environment(env)
    assert env == {}
    assert notifier.enabled  # other notifications still go out
    assert notifier.watchdog_interval is None
    start = trio.current_time()
    await notifier.watchdog_loop()  # returns at once
    assert trio.current_time() == start
    assert not notifier.watchdog()
    notifier.ready()
    assert receiver.messages() == [b"READY=1"]


@pytest.mark.parametrize("value", ["0", "-5", "ten", ""])
def test_bad_watchdog_usec_disables_the_watchdog(
    receiver: Receiver, logs: ListHandler, value: str
) -> None:
    notifier = from_environment({"NOTIFY_SOCKET": receiver.name, "WATCHDOG_USEC": value})
    assert notifier.enabled
    assert notifier.watchdog_interval is None
    assert len(logs.messages(logging.WARNING)) == 1


# --- failures never raise ---------------------------------------------------------------------


async def test_missing_socket_is_logged_once_and_never_raises(
    short_dir: Path, logs: ListHandler, autojump_clock: trio.testing.MockClock
) -> None:
    name = str(short_dir / "notify")
    notifier = notifier_for(name, WATCHDOG_USEC)
    assert notifier.enabled
    assert not notifier.ready("up")
    assert not notifier.status("x")
    assert not notifier.reloading()
    assert not notifier.stopping()
    with trio.move_on_after(60):  # the loop keeps going through failures
        await notifier.watchdog_loop()
    warnings = logs.messages(logging.WARNING)
    assert len(warnings) == 1
    assert name in warnings[0]

    # systemd comes back (say after daemon-reexec): sends work again, and are reported once more.
    receiver = bind_receiver(name)
    assert notifier.status("back")
    assert receiver.messages() == [b"STATUS=back"]
    assert len(logs.messages(logging.INFO)) == 1
    receiver.sock.close()
    os.unlink(name)
    assert not notifier.watchdog()
    assert len(logs.messages(logging.WARNING)) == 2
    notifier.close()


def test_full_queue_neither_blocks_nor_raises(receiver: Receiver, logs: ListHandler) -> None:
    notifier = notifier_for(receiver.name, WATCHDOG_USEC)
    # Nobody reads: the receiver's queue fills (net.unix.max_dgram_qlen) and sends would block.
    results = [notifier.watchdog() for _ in range(5000)]
    assert results[0]
    assert not results[-1]
    assert len(logs.messages(logging.WARNING)) == 1
    notifier.close()


def test_receiver_gone_never_raises(receiver: Receiver, logs: ListHandler) -> None:
    notifier = notifier_for(receiver.name)
    assert notifier.ready()
    receiver.sock.close()
    assert not notifier.stopping()
    assert not notifier.stopping()
    assert len(logs.messages(logging.WARNING)) == 1


def test_closed_notifier_is_a_no_op(receiver: Receiver) -> None:
    notifier = notifier_for(receiver.name, WATCHDOG_USEC)
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    assert not notifier.ready()
    assert receiver.messages() == []


@pytest.mark.parametrize("name", ["relative/path", "@", "vsock:2:1234"])
def test_unsupported_addresses_disable_notification(name: str, logs: ListHandler) -> None:
    notifier = from_environment({"NOTIFY_SOCKET": name})
    assert not notifier.enabled
    assert not notifier.ready()
    assert len(logs.messages(logging.WARNING)) == 1
