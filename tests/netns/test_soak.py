"""The chaos soak for 60 s (`tests.lab.soak`, docs/soak.md): workers and the supervisor are
SIGKILLed, SIGSTOPped and SIGCONTed (the supervisor restarted on the same state directory after a
kill), links flap, rules are churned and a few hundred loaded at once, all while traffic flows;
the soak's invariants must hold: no rule lost, no orphan process or socket file, no wedged
request or worker, descriptors and RSS flat. Performance figures (loss, recovery times) are
printed, not asserted: a loaded 2-CPU machine must pass too.

The soak runs as its own process (it makes itself a child subreaper to catch orphaned workers);
on a timeout it gets SIGINT, which ends its processes and deletes its namespaces, and only then,
if it is still there, SIGKILL.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import topology
from tests.lab.processes import end_process

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.soak,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
]

ROOT = Path(__file__).resolve().parents[2]  # where `tests.lab.soak` is importable from
DURATION_S = 60
# set-up, the last segment running over the budget, the end checkpoint and the final checks
TIMEOUT_S = DURATION_S + 120


def test_soak_60s_keeps_its_invariants() -> None:
    # longer than the suite's faulthandler_timeout by design: dump the stacks only if it hangs
    faulthandler.dump_traceback_later(TIMEOUT_S + 60)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.lab.soak",
            "--duration",
            str(DURATION_S),
            "--seed",
            "1",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the soak cleans up on Ctrl-C
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"the soak did not finish within {TIMEOUT_S} s:\n{err[-4000:]}")
    finally:
        # e.g. pytest itself was interrupted: let the soak clean up
        end_process(proc, signal.SIGINT, grace=60)
    print(err)  # progress lines and the human report (pytest shows it with -s or on failure)
    assert proc.returncode in (0, 1), err[-4000:]
    report = json.loads(out)
    failed = [f"{c['name']}: {c['detail']}" for c in report["checks"] if not c["ok"]]
    assert report["invariants"] == {
        "rules_lost": 0,
        "orphans": 0,
        "wedges": 0,
        "growth_flat": True,
    }, failed
    assert report["result"] == "pass", failed
    assert proc.returncode == 0
    kinds = report["by_kind"]
    assert {"kill-supervisor", "stop-worker"} <= set(kinds), kinds
