"""A relay under test: the chain topology, a real supervisor in relay-ns, gen and sink processes.

Processes are started in the namespaces with `ip netns exec` and ended by PID; namespaces are
deleted by the topology context manager, also when a test fails. Every gen run is bounded by
--count and every sink run by --count/--duration/--idle-timeout and a subprocess timeout.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.lab import topology
from tests.lab.daemon import Daemon, daemon


def mcrelay(ns: topology.Netns, *args: str) -> list[str]:
    return ns.cmd(sys.executable, "-m", "mcrelay", *args)


class Sink:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def result(self, timeout: float = 30) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        result: dict[str, Any] = json.loads(out)
        return result


@contextlib.contextmanager
def sink(ns: topology.Netns, group: str, port: int, interface: str, *args: str) -> Iterator[Sink]:
    """A sink that has joined its group (it says "ready" on stderr) before this yields."""
    proc = subprocess.Popen(
        mcrelay(ns, "sink", "--group", group, "--port", str(port), "--interface", interface,
                "--json", *args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 10
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "sink did not become ready"
            if select.select([proc.stderr], [], [], left)[0]:
                line = proc.stderr.readline()
                assert line, "sink exited early"
                if line.startswith("ready"):
                    break
        yield Sink(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def gen(ns: topology.Netns, group: str, port: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        mcrelay(ns, "gen", "--group", group, "--port", str(port), *args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def run_gen(ns: topology.Netns, group: str, port: int, *args: str) -> None:
    proc = gen(ns, group, port, *args)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


@contextlib.contextmanager
def relay_daemon(
    ns: topology.Netns, tmp: Path, *args: str, python: str = sys.executable
) -> Iterator[Daemon]:
    """A supervisor in ``ns`` with all workers running; ended by PID however the test ends."""
    with daemon(tmp, *args, prefix=tuple(ns.cmd()), python=python) as d:
        d.wait_running()
        yield d
