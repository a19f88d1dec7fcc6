"""A supervisor short of descriptors stays up, says why, and recovers (a real daemon in a netns).

The test lowers the running supervisor's soft open-file limit to 64 with ``prlimit --pid``: a
load of 1,000 group memberships (one helper socket per 20) is then refused, naming the limit.
Loaded with the limit raised, and the limit lowered again below what the daemon holds, a worker
restart finds no descriptor; the limit raised back, the daemon catches up by itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.lab import topology
from tests.lab.daemon import daemon, wait_for

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
            # Short of descriptors before the change: it is priced and refused, in one sentence.
            _nofile(supervisor, 64)
            refused = d.cli("config", "load", str(conf))
            assert refused.returncode == 1, refused
            assert "over the open-file limit of 64" in refused.stderr, refused.stderr
            assert "nothing changed" in refused.stderr and "Traceback" not in refused.stderr
            assert json.loads(d.ok("rules", "--json")) == []
            # Made with room to spare, then the room taken away under the daemon's feet.
            _nofile(supervisor, 4096)
            d.ok("config", "load", str(conf))
            wait_for(lambda: ns.ip("maddr", "show", "dev", "d0").count("239.5.") == GROUPS, 10)
            _nofile(supervisor, 64)
            restart = d.cli("restart-worker", "data-0")
            # Still up and answering, whatever the restart said.
            assert d.proc.poll() is None, d.log.read_text()[-3000:]
            d.ok("ping")
            wait_for(lambda: "Too many open files" in d.log.read_text(), 10)
            log = d.log.read_text()
            # Said once per cause, and never blamed on the interface.
            assert log.count("Too many open files") <= 3, log[-3000:]
            assert "no interface" not in log and "does not exist" not in log, log[-3000:]
            assert "Traceback" not in restart.stderr, restart
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
