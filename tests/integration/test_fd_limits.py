"""Valid rules never crash-loop workers for lack of descriptors (a real daemon, real limits)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.lab.daemon import daemon, wait_for

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")

RULES, OUTPUTS = 16, 64


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_outputs_on_absent_interfaces_cost_no_descriptor_each(tmp_path: Path) -> None:
    """16 rules x 64 outputs, each on its own absent interface, under a hard limit of 1024
    open files (which the supervisor cannot raise): every rule is accepted, no worker restarts,
    and a data worker's descriptors stay far below one per output."""
    with daemon(
        tmp_path, "--num-workers", "2", prefix=("prlimit", "--nofile=1024:1024", "--")
    ) as d:
        before = d.wait_running()
        data_pid = before["data-0"]["pid"]
        fds_before = _fds(data_pid)
        for r in range(RULES):
            outputs = [
                arg
                for o in range(OUTPUTS)
                for arg in ("--output", f"239.3.{r}.{o + 1}:6000:gh{r}x{o}")
            ]
            d.ok(
                "add", "--input-interface", "ghostin", "--input-group", f"239.2.0.{r + 1}",
                "--input-port", "5000", *outputs,
            )  # fmt: skip
        # The workers have installed every rule ...
        wait_for(
            lambda: all(w["rules"] == RULES for w in d.workers().values() if w["kind"] == "data"),
            10,
        )
        # ... and keep running through a few stats pushes, which also retry the dead outputs.
        time.sleep(2.5)
        after = d.workers()
        for wid, w in after.items():
            assert w["state"] == "running", (wid, w, d.log.read_text()[-3000:])
            assert w["pid"] == before[wid]["pid"], (wid, "restarted", d.log.read_text()[-3000:])
            assert w["restarts"] == before[wid]["restarts"]
        fds_after = _fds(data_pid)
        print(f"data-0 descriptors: {fds_before} before, {fds_after} with "
              f"{RULES} rules x {OUTPUTS} outputs")  # fmt: skip
        assert fds_after - fds_before < 16, (fds_before, fds_after)


def test_supervisor_raises_its_soft_open_file_limit(tmp_path: Path) -> None:
    with daemon(
        tmp_path, "--num-workers", "1", prefix=("prlimit", "--nofile=1024:4096", "--")
    ) as d:
        workers = d.wait_running()
        for pid in (d.proc.pid, workers["data-0"]["pid"]):
            limits = Path(f"/proc/{pid}/limits").read_text()
            line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
            assert line.split()[3:5] == ["4096", "4096"], line
