"""systemd's notification protocol (``sd_notify``) without libsystemd.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (an ``AF_UNIX`` datagram socket: a path, or
an abstract name written with a leading ``@``) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` and
``WATCHDOG_PID``. The supervisor takes all three out of its environment when it starts, so no
worker ever inherits them, and sends newline-separated ``KEY=VALUE`` datagrams:

- ``READY=1`` once every worker runs, ``STATUS=…`` with what it is doing;
- ``RELOADING=1`` with ``MONOTONIC_USEC=`` (systemd ≥ 253 wants both) while a SIGHUP reload runs,
  then ``READY=1`` again;
- ``STOPPING=1`` when asked to stop;
- ``WATCHDOG=1`` every half ``WATCHDOG_USEC``, from a task on the supervisor's own trio loop: a
  loop that hangs stops the pings and systemd restarts the service.

Sends are non-blocking and never raise: a missing or full socket is logged once (again only after
a send has worked in between), and the daemon runs on. Without ``NOTIFY_SOCKET`` every method does
nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping
from types import TracebackType

import trio

log = logging.getLogger("mcrelay.systemd")

#: What systemd hands the main process only; removed from the environment at start.
ENVIRONMENT_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _socket_address(name: str) -> bytes | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value; None if unsupported."""
    if name.startswith("/"):
        return os.fsencode(name)
    if name.startswith("@") and len(name) > 1:
        return b"\0" + os.fsencode(name[1:])
    return None  # e.g. "vsock:CID:PORT" (systemd ≥ 254, for VMs): not for a host daemon


def _watchdog_usec(environ: MutableMapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` if the watchdog watches this process (``sd_watchdog_enabled``)."""
    raw_usec = environ.pop("WATCHDOG_USEC", None)
    raw_pid = environ.pop("WATCHDOG_PID", None)
    if raw_usec is None:
        return None
    try:
        usec = int(raw_usec)
        pid = int(raw_pid) if raw_pid is not None else None
    except ValueError:
        log.warning(
            "ignoring the watchdog: WATCHDOG_USEC=%r WATCHDOG_PID=%r are not numbers",
            raw_usec,
            raw_pid,
        )
        return None
    if usec <= 0:
        log.warning("ignoring the watchdog: WATCHDOG_USEC=%r", raw_usec)
        return None
    if pid is not None and pid != os.getpid():
        return None  # the watchdog is meant for another process
    return usec


class SystemdNotifier:
    """Sends notifications to systemd; does nothing when not started by systemd."""

    def __init__(self, notify_socket: str | None = None, watchdog_usec: int | None = None) -> None:
        self._name = notify_socket
        self._address: bytes | None = None
        self._sock: socket.socket | None = None
        self._failing = False
        self._announced_ready = False
        if notify_socket:
            self._address = _socket_address(notify_socket)
            if self._address is None:
                log.warning("not notifying systemd: unsupported NOTIFY_SOCKET=%r", notify_socket)
        if self._address is not None:
            try:
                # Non-inheritable (CLOEXEC) like every Python socket: workers never get it.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            except OSError as exc:
                log.warning("cannot notify systemd: %s", exc)
                self._address = None
        #: Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None: no watchdog.
        self.watchdog_interval: float | None = (
            watchdog_usec / 2_000_000 if self.enabled and watchdog_usec else None
        )

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> SystemdNotifier:
        """Take ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` out of ``environ``.

        Call once, in the main process, before any child is started: the variables are removed
        whatever their values, so no child can inherit them.
        """
        env = os.environ if environ is None else environ
        notify_socket = env.pop("NOTIFY_SOCKET", None)
        watchdog_usec = _watchdog_usec(env)
        return cls(notify_socket, watchdog_usec)

    @property
    def enabled(self) -> bool:
        """Whether there is a systemd to notify."""
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- messages -------------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Startup finished (``READY=1``), optionally with a status line."""
        self._announced_ready = True
        return self.notify("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(*_status(text))

    def reloading(self, status: str | None = None) -> bool:
        """A reload began (``RELOADING=1`` with the ``MONOTONIC_USEC`` systemd ≥ 253 requires)."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *_status(status))

    def reloaded(self, status: str | None = None) -> bool:
        """A reload ended: ``READY=1`` again, unless startup had not finished yet (a SIGHUP
        during startup must not announce a readiness that ``ready()`` has not)."""
        if self._announced_ready:
            return self.notify("READY=1", *_status(status))
        return self.notify(*_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began (``STOPPING=1``)."""
        return self.notify("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        """One watchdog ping (``WATCHDOG=1``), if a watchdog watches this process."""
        if self.watchdog_interval is None:
            return False
        return self.notify("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """Ping the watchdog now and every half ``WATCHDOG_USEC``; returns at once if there is
        no watchdog for this process. Run it in the supervisor's nursery: the pings stop, and
        systemd steps in, exactly when that trio loop stops making progress."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await trio.sleep(interval)

    def notify(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; whether it was sent. Never blocks or raises."""
        if self._sock is None or self._address is None or not fields:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            self._sock.sendto(data, self._address)
        except OSError as exc:  # missing socket, refused, full queue (EAGAIN): drop this one
            if not self._failing:
                self._failing = True
                log.warning("cannot notify systemd on %s: %s", self._name, exc)
            return False
        if self._failing:
            self._failing = False
            log.info("notifying systemd on %s works again", self._name)
        return True


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)
