"""The relay under test: a supervisor the soak starts, kills and restarts on the same state
directory, the control requests it answers (a late answer is a wedge), and a sampler of its
descriptors and RSS."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mcrelay import client
from mcrelay.errors import McrelayError
from mcrelay.ipc import messages as m
from tests.lab import topology
from tests.lab.processes import end_process, poll
from tests.lab.soak.procs import Ident, cmdline, ident_of
from tests.lab.soak.settings import REQUEST_DEADLINE_S, SAMPLE_EVERY_S, SUPERVISOR_ARGS


class Relay:
    """The supervisor (our own Popen, restartable on the same state directory) and its workers."""

    def __init__(self, ns: topology.Netns, tmp: Path) -> None:
        self.ns = ns
        self.socket = tmp / "control.sock"
        self.state_dir = tmp / "state"
        self.log = tmp / "supervisor.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.instance = 0
        self.seen: set[Ident] = set()  # every worker process any of our supervisors listed
        self.current: dict[str, dict[str, Any]] = {}
        self.requests = 0  # control requests made (client library and CLI)
        self.wedges: list[str] = []  # control requests that got no answer within their deadline
        self.stopped = False  # the soak holds the supervisor SIGSTOPped

    def call(self, req: Any, deadline: float = REQUEST_DEADLINE_S) -> Any:
        """One control request; no answer within ``deadline`` is a wedge (and an error)."""
        self.requests += 1
        t = time.monotonic()
        try:
            return client.call(self.socket, req, timeout=deadline)
        except McrelayError:
            if time.monotonic() - t >= deadline - 0.05:
                self.wedges.append(f"{type(req).__name__}: no answer within {deadline:g} s")
            raise

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                self.ns.cmd(
                    sys.executable,
                    "-m",
                    "mcrelay",
                    "supervisor",
                    "--control-socket",
                    str(self.socket),
                    "--state-dir",
                    str(self.state_dir),
                    *SUPERVISOR_ARGS,
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.proc.pid  # `ip netns exec` execs: this is the supervisor itself
        self.instance += 1
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the supervisor exited ({proc.returncode}):\n{self.log_tail()}")
            try:
                self.call(m.Ping())
            except McrelayError:
                return False
            return True

        if not poll(answers, 15):
            raise RuntimeError(f"the supervisor did not answer within 15 s:\n{self.log_tail()}")

    def workers(self) -> dict[str, dict[str, Any]]:
        found = {w["id"]: w for w in self.call(m.ListWorkers())}
        for w in found.values():
            if w["pid"] and (ident := ident_of(w["pid"])) is not None:
                w["ident"] = ident
                self.seen.add(ident)
        return found

    def rules(self) -> list[dict[str, Any]]:
        return list(self.call(m.ListRules()))

    def cli(
        self, *args: str, deadline: float = REQUEST_DEADLINE_S
    ) -> subprocess.CompletedProcess[str]:
        """The CLI, as a user runs it; a request it reports unanswered, or a CLI that does not
        finish within ``deadline`` (+ its own start-up), is a wedge."""
        self.requests += 1
        argv = [sys.executable, "-m", "mcrelay", *args, "--socket", str(self.socket)]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=deadline + 20)
        except subprocess.TimeoutExpired:
            self.wedges.append(f"mcrelay {args[0]}: no answer within {deadline + 20:g} s")
            return subprocess.CompletedProcess(argv, 124, "", "timed out")
        if "did not answer within" in result.stderr:
            self.wedges.append(f"mcrelay {args[0]}: {result.stderr.strip()}")
        return result

    def kill(self) -> None:
        if self.proc is not None:
            end_process(self.proc, signal.SIGKILL)

    def pause(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
            self.stopped = True

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def stop(self) -> int | None:
        """SIGTERM; the exit status, or None if it had to be killed after 5 s."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.resume()  # a stopped supervisor would never act on SIGTERM
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class Sampler(threading.Thread):
    """The supervisor's descriptor count and RSS every SAMPLE_EVERY_S, tagged by instance."""

    def __init__(self, relay: Relay, t0: float) -> None:
        super().__init__(daemon=True)
        self.relay, self.t0 = relay, t0
        self.samples: list[tuple[float, int, int, int]] = []  # (t, instance, fds, rss KiB)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(SAMPLE_EVERY_S):
            pid, instance = self.relay.pid, self.relay.instance
            try:
                if b"supervisor" not in cmdline(pid):
                    continue
                fds = len(os.listdir(f"/proc/{pid}/fd"))
                status = Path(f"/proc/{pid}/status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            if match and fds:
                self.samples.append((time.monotonic() - self.t0, instance, fds, int(match[1])))


# --- traffic --------------------------------------------------------------------------------
