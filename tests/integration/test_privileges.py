"""The supervisor refuses to start when its workers could not leave root's uid, unless told with
the option that says it is unsafe. A user namespace that maps only root makes the drop
impossible (no other uid exists there)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.lab.daemon import daemon

ROOT_ONLY = ("unshare", "--user", "--map-root-user", "--net")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or shutil.which("unshare") is None
    or subprocess.run([*ROOT_ONLY, "true"], capture_output=True, timeout=10).returncode != 0,
    reason="needs root and user namespaces",
)


def test_supervisor_refuses_when_workers_cannot_drop_root(tmp_path: Path) -> None:
    with daemon(tmp_path, "--num-workers", "1", prefix=ROOT_ONLY, ready=False) as d:
        assert d.proc.wait(timeout=15) == 2
        log = d.log.read_text()
    assert "workers cannot drop their privileges" in log
    assert "--unsafe-keep-worker-root" in log
    assert "Traceback" not in log
    assert not d.socket.exists()


def test_the_unsafe_option_starts_with_root_workers_and_says_so(tmp_path: Path) -> None:
    args = ("--num-workers", "1", "--unsafe-keep-worker-root")
    with daemon(tmp_path, *args, prefix=ROOT_ONLY) as d:
        d.wait_running()
        assert d.ok("ping") == "pong\n"
        assert "UNSAFE: workers run with root's uid" in d.log.read_text()
