"""Waiting on conditions and ending processes the lab started, shared by tests and scripts."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def poll(predicate: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T | None:
    """Poll until ``predicate`` returns something truthy; None at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def wait_for(predicate: Callable[[], T | None], timeout: float = 5.0, interval: float = 0.02) -> T:
    """Poll until ``predicate`` returns something truthy; fail clearly at the deadline."""
    value = poll(predicate, timeout, interval)
    if not value:
        raise AssertionError(f"condition not met within {timeout} s")
    return value


def end_process(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL, grace: float = 5) -> None:
    """Send ``sig`` to a process this lab started (if it still runs), and SIGKILL it if it has
    not exited ``grace`` seconds later; it is reaped either way."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
