"""A supervisor short of descriptors stays up, says why, and recovers (a real daemon in a netns).

The test lowers the running supervisor's soft open-file limit to 64 with ``prlimit --pid``, asks
for 1,000 group memberships (one helper socket per 20) and a worker restart, then raises the
limit back and waits for the daemon to catch up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.daemon import daemon, wait_for
from tests.netns import topology

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
    pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit"),
]

GROUPS = 1000


def _nofile(pid: int, soft: int) -> None:
    hard = next(
        line.split()[4]
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
        if line.startswith("Max open files")
    )
    subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:{hard}"], check=True)


def test_out_of_descriptors_the_supervisor_stays_up_and_recovers(tmp_path: Path) -> None:
    rule = '[[rule]]\ninput-interface = "d0"\ninput-group = "239.5.{a}.{b}"\ninput-port = 5000\n'
    rule += 'outputs = ["239.6.0.1:5000:d1"]\n'
    conf = tmp_path / "many.toml"
    conf.write_text("\n".join(rule.format(a=n // 250, b=n % 250 + 1) for n in range(GROUPS)))
    with topology.namespaces("nofile") as created:
        ns = created["nofile"]
        ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
        for name in ("d0", "d1"):
            ns.ip("link", "set", name, "up")
        with daemon(tmp_path, "--num-workers", "1", prefix=tuple(ns.cmd())) as d:
            before = d.wait_running()
            supervisor = d.proc.pid
            _nofile(supervisor, 64)
            load = d.cli("config", "load", str(conf))
            restart = d.cli("restart-worker", "data-0")
            # Still up and answering, whatever those two said.
            assert d.proc.poll() is None, d.log.read_text()[-3000:]
            d.ok("ping")
            wait_for(lambda: "Too many open files" in d.log.read_text(), 10)
            log = d.log.read_text()
            # Said once per cause, not once per group, and never blamed on the interface.
            assert log.count("cannot join") <= 2, log[-3000:]
            assert "no interface" not in log and "does not exist" not in log, log[-3000:]
            assert "Traceback" not in load.stderr + restart.stderr, (load, restart)
            assert d.proc.poll() is None
            _nofile(supervisor, 4096)
            # Recovered: data-0 runs a new process with every rule, all of them active.

            def recovered() -> bool:
                w = d.workers()["data-0"]
                return w["state"] == "running" and w["rules"] == GROUPS

            wait_for(recovered, 30, interval=0.2)
            assert d.workers()["data-0"]["pid"] != before["data-0"]["pid"]
            rules = json.loads(d.ok("rules", "--json"))
            assert len(rules) == GROUPS
            assert {r["state"] for r in rules} == {"active"}, d.log.read_text()[-3000:]
            assert d.proc.poll() is None
            # ... and every group is joined again (retried without any change being made).
            wait_for(lambda: ns.ip("maddr", "show", "dev", "d0").count("239.5.") == GROUPS, 10)
