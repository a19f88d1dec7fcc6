"""Checks shared by the stop-signal tests (integration and netns): one clean, ordered stop."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from mcrelay import config
from mcrelay import rules as rules_mod
from tests.lab.daemon import Daemon, pid_alive, wait_for


def stop_with(d: Daemon, signals: tuple[signal.Signals, ...], gap: float = 0.05) -> int:
    """Send ``signals`` ``gap`` seconds apart (while the process exists); its exit status."""
    for signum in signals:
        if d.proc.poll() is not None:
            break
        d.proc.send_signal(signum)
        time.sleep(gap)
    try:
        return d.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError("the supervisor did not stop within 10 s") from None


def saved_digest(state_dir: Path) -> str:
    state = state_dir / "rules.toml"
    return rules_mod.digest(config.load(state) if state.exists() else ())


def assert_stopped_cleanly(
    d: Daemon, status: int, workers: dict[str, dict[str, object]], state_dir: Path, digest: str
) -> None:
    log = d.log.read_text()
    assert status == 0, log[-3000:]
    assert not d.socket.exists()
    assert saved_digest(state_dir) == digest
    assert log.count(": stopping") == 1, log[-3000:]
    assert "supervisor stopped" in log
    for w in workers.values():
        wait_for(lambda pid=w["pid"]: not pid_alive(pid), timeout=2)  # type: ignore[misc]
    # In order: the control worker first, then the data workers; each obeyed Stop (status 0).
    stopped = re.findall(r"worker (\S+) \(pid \d+\) stopped: (.*)", log)
    assert stopped and stopped[0][0] == "control", stopped
    assert sorted(name for name, _ in stopped) == sorted(workers), stopped
    assert all(how == "exit status 0" for _, how in stopped), stopped
