"""The chaos soak in its short mode (scripts/soak.py, docs/soak.md): under 60 s of worker kills,
hangs, a supervisor kill and restart, and rule churn while traffic flows; every check must pass.

The soak runs as its own process (it makes itself a child subreaper to catch orphaned workers);
on a timeout it gets SIGINT, which ends its processes and deletes its namespaces, and only then,
if it is still there, SIGKILL.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import topology

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
]

SOAK = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def test_short_soak_passes() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(SOAK), "--minutes", "0.7", "--seed", "1", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=75)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the soak cleans up on Ctrl-C
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"the soak did not finish within 75 s:\n{err[-4000:]}")
    finally:
        if proc.poll() is None:  # e.g. pytest itself was interrupted: let the soak clean up
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(err)  # progress lines and the human report (pytest shows it with -s or on failure)
    assert proc.returncode in (0, 1), err[-4000:]
    report = json.loads(out)
    failed = [f"{c['name']}: {c['detail']}" for c in report["checks"] if not c["ok"]]
    assert report["result"] == "pass", failed
    assert proc.returncode == 0
    assert report["duration_s"] < 60
    kinds = report["by_kind"]
    assert {"kill-data", "kill-supervisor", "stop-worker"} <= set(kinds), kinds
