"""A data worker's messages are untrusted input: one that says something wrong is restarted, and
the supervisor stays up and keeps answering (faults injected with ``MCRELAY_FAULT_FILE``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

from tests.lab.daemon import daemon, wait_for

RULE = [
    "--input-interface", "in0", "--input-group", "239.1.1.1", "--input-port", "5000",
    "--output", "239.9.9.9:6000:o", "--id", "a",
]  # fmt: skip


@pytest.mark.parametrize(
    ("fault", "logged"),
    [
        ("stats-overflow", "broke the protocol: invalid message"),
        ("send-fd", "broke the protocol: file descriptors are not accepted"),
        ("bad-digest", "after 3 resyncs"),
    ],
)
def test_a_worker_that_says_something_wrong_is_restarted(
    tmp_path: Path, fault: str, logged: str
) -> None:
    faults = tmp_path / "faults"
    faults.write_text(f"data:{fault}\n")
    env = {"MCRELAY_FAULT_FILE": str(faults)}
    with daemon(tmp_path, "--num-workers", "1", env=env) as d:
        d.ok("add", *RULE)
        wait_for(lambda: logged in d.log.read_text(), 10)
        faults.unlink()  # the next replacement is healthy
        healthy = wait_for(
            lambda: (w := d.workers()["data-0"])["state"] == "running" and w["rules"] == 1 and w,
            15,
        )
        assert healthy["restarts"] >= 1
        assert d.proc.poll() is None  # the supervisor never went down
        stats = json.loads(d.ok("stats", "--json"))  # its totals still encode
        assert [r["id"] for r in stats["rules"]] == ["a"]
        assert stats["kernel_drops"] < 2**64
        log = d.log.read_text()
        assert "Traceback" not in log
        if fault == "bad-digest":  # resyncs were bounded, not one per wrong ack
            assert log.count("resyncing") <= 3 * healthy["restarts"]


def test_garbage_in_a_dead_workers_counter_page_is_refused(tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    faults.write_text("data:page-garbage\n")
    with daemon(tmp_path, "--num-workers", "1", env={"MCRELAY_FAULT_FILE": str(faults)}) as d:
        d.ok("add", *RULE)
        victim = wait_for(lambda: (w := d.workers()["data-0"])["rules"] == 1 and w["pid"], 10)
        # the page is scribbled on after each report: wait for one made after the rule was held
        scribbled = d.log.read_text().count("fault injected: page-garbage")
        wait_for(lambda: d.log.read_text().count("fault injected: page-garbage") > scribbled, 10)
        faults.unlink()
        with contextlib.suppress(ProcessLookupError):  # it may have died already: same page
            os.kill(victim, signal.SIGKILL)
        d.wait_replaced("data-0", victim)
        wait_for(lambda: "out of bounds in its counter page: ignored" in d.log.read_text(), 5)
        stats = json.loads(d.ok("stats", "--json"))
        (rule,) = stats["rules"]
        assert (rule["packets_in"], rule["bytes_in"]) == (0, 0)
        assert [(o["packets"], o["errors"]) for o in rule["outputs"]] == [(0, 0)]
        assert d.proc.poll() is None
        assert "Traceback" not in d.log.read_text()
