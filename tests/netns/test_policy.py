"""The access policy against a real daemon in a namespace: what rules may name, set by root only.

The namespace has ``lo`` and a veth pair inside it: ``d0`` with the address 10.200.5.1 (an address
of "this host" for a daemon running there) and ``d1`` without one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import topology
from tests.lab.daemon import Daemon, daemon

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
]

HOST_ADDR = "10.200.5.1"


@pytest.fixture
def ns() -> Iterator[topology.Netns]:
    with topology.namespaces("policy") as created:
        ns = created["policy"]
        ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
        for name in ("d0", "d1"):
            ns.ip("link", "set", name, "up")
        ns.ip("addr", "add", f"{HOST_ADDR}/24", "dev", "d0")
        yield ns


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def start(ns: topology.Netns, tmp: Path, *args: str) -> Iterator[Daemon]:
    with daemon(tmp, "--num-workers", "1", *args, prefix=tuple(ns.cmd())) as d:
        d.wait_running()
        yield d


def add(d: Daemon, interface: str, group: str, port: int, *outputs: str, rid: str = "r") -> str:
    args = ["add", "--id", rid, "--input-interface", interface, "--input-group", group,
            "--input-port", str(port)]  # fmt: skip
    for out in outputs:
        args += ["--output", out]
    result = d.cli(*args)
    return "ok" if result.returncode == 0 else result.stderr


REFUSED = [
    (("lo", "239.1.1.1", 5000, "239.2.2.2:5000:d0"),
     "input interface lo is the loopback interface (allowed only with --allow-loopback)"),
    (("d0", "127.0.0.53", 53, "239.2.2.2:5000:d0"),
     "input 127.0.0.53 is a loopback address (127.0.0.0/8 is allowed only with --allow-loopback)"),
    (("d0", HOST_ADDR, 5000, "239.2.2.2:5000:d1"),
     f"input {HOST_ADDR} is an address of this host (allowed only with --allow-host-input)"),
    (("d0", "239.1.1.1", 5000, "127.0.0.1:53:d1"),
     "output 127.0.0.1:53 on d1 is a loopback address (allowed only with --allow-loopback)"),
    (("d0", "239.1.1.1", 5000, "239.2.2.2:5000:lo"),
     "output 239.2.2.2:5000 on lo uses the loopback interface (allowed only with "
     "--allow-loopback)"),
]  # fmt: skip


def test_default_policy_refuses_loopback_and_host_inputs(ns: topology.Netns, tmp: Path) -> None:
    for d in start(ns, tmp):
        for (interface, group, port, output), reason in REFUSED:
            said = add(d, interface, group, port, output)
            assert said == f"mcrelay: rule r is refused by policy: {reason}\n"
        # A config load with one such rule is refused whole and changes nothing.
        config = tmp / "rules.toml"
        config.write_text(
            '[[rule]]\nid = "a"\ninput-interface = "d0"\ninput-group = "239.1.1.1"\n'
            'input-port = 5000\noutputs = ["239.2.2.2:5000:d1"]\n'
            '[[rule]]\nid = "b"\ninput-interface = "lo"\ninput-group = "239.1.1.2"\n'
            'input-port = 5000\noutputs = ["239.2.2.2:5000:d1"]\n'
        )
        loaded = d.cli("config", "load", str(config))
        assert loaded.returncode == 1
        assert "rule b is refused by policy: input interface lo is the loopback" in loaded.stderr
        assert json.loads(d.ok("rules", "--json")) == []
        # Everything else is allowed: multicast and foreign unicast inputs, unicast outputs.
        assert add(d, "d0", "239.1.1.1", 5000, "10.200.6.9:6000:d1", rid="m") == "ok"
        assert add(d, "d1", "10.200.7.7", 5000, "239.2.2.2:5000:d0", rid="u") == "ok"
        assert {r["id"]: r["state"] for r in json.loads(d.ok("rules", "--json"))} == {
            "m": "active",
            "u": "active",
        }


def test_allow_options_accept_what_the_default_refuses(ns: topology.Netns, tmp: Path) -> None:
    for d in start(ns, tmp, "--allow-loopback", "--allow-host-input", f"{HOST_ADDR}/32:5000-5009"):
        for i, ((interface, group, port, output), _) in enumerate(REFUSED):
            assert add(d, interface, group, port + i, output, rid=f"r{i}") == "ok"
        assert "address of this host" in add(d, "d0", HOST_ADDR, 6000, "239.2.2.2:5000:d1", rid="p")
        states = {r["id"]: r["state"] for r in json.loads(d.ok("rules", "--json"))}
        assert states == {f"r{i}": "active" for i in range(len(REFUSED))}


def test_allow_lists_restrict_inputs_and_outputs(ns: topology.Netns, tmp: Path) -> None:
    args = ["--allow-input-interface", "d0", "--allow-output", "239.0.0.0/8",
            "--allow-output", "10.200.6.0/24:6000-6099%d1"]  # fmt: skip
    for d in start(ns, tmp, *args):
        assert add(d, "d0", "239.1.1.1", 5000, "239.2.2.2:5000:d1", "10.200.6.9:6050:d1") == "ok"
        assert add(d, "d1", "239.1.1.2", 5000, "239.2.2.2:5000:d0", rid="x") == (
            "mcrelay: rule x is refused by policy: input interface d1 is not in "
            "--allow-input-interface (d0)\n"
        )
        assert add(d, "d0", "239.1.1.3", 5000, "10.200.6.9:7000:d1", rid="y") == (
            "mcrelay: rule y is refused by policy: output 10.200.6.9:7000 on d1 matches no "
            "--allow-output (239.0.0.0/8, 10.200.6.0/24:6000-6099%d1)\n"
        )


def test_a_malformed_policy_option_stops_the_start_in_one_sentence(tmp: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mcrelay", "supervisor", "--control-socket", str(tmp / "s"),
         "--allow-output", "10.0.0.0/8:0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "mcrelay: --allow-output '10.0.0.0/8:0': ports 0 are not a range within 1-65535 "
        "(use PREFIX[:PORTS][%INTERFACE])\n"
    )
    assert not (tmp / "s").exists()


def metrics_in(ns: topology.Netns, port: int) -> str:
    fetch = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"  # noqa: E501
    return ns.run(sys.executable, "-c", fetch)


def test_saved_rules_that_a_new_policy_refuses_are_kept_as_refused(
    ns: topology.Netns, tmp: Path
) -> None:
    for d in start(ns, tmp, "--allow-loopback"):
        assert add(d, "lo", "239.1.1.1", 5000, "239.2.2.2:5000:d0", rid="loop") == "ok"
        assert add(d, "d0", "239.1.1.2", 5000, "239.2.2.3:5000:d1", rid="fine") == "ok"
        assert add(d, "d0", "239.1.1.5", 5000, "127.0.0.1:5000:d1", rid="out") == "ok"
    saved = tmp / "state" / "rules.toml"
    assert 'id = "loop"' in saved.read_text()
    # The same state under the default policy: listed as refused, kept on disk, not installed.
    for d in start(ns, tmp, "--metrics-listen", "127.0.0.1:9464"):
        rules = {r["id"]: r for r in json.loads(d.ok("rules", "--json"))}
        assert rules["fine"]["state"] == "active"
        assert rules["loop"]["state"] == "refused"
        reason = (
            "rule loop is refused by policy: input interface lo is the loopback interface "
            "(allowed only with --allow-loopback)"
        )
        assert rules["loop"]["reason"] == reason
        assert rules["out"]["state"] == "refused"
        assert "refused" in d.ok("rules")
        assert d.workers()["data-0"]["rules"] == 1  # only "fine" reached the data worker
        assert f"{reason}; it stays listed as refused and is not installed" in d.log.read_text()
        metrics = metrics_in(ns, 9464)
        assert 'mcrelay_rule_state{rule="loop",state="refused"} 1' in metrics
        assert 'mcrelay_rule_state{rule="fine",state="active"} 1' in metrics
        # A change keeps it saved; adding it again is refused; removing it removes it.
        assert add(d, "d0", "239.1.1.3", 5000, "239.2.2.4:5000:d1", rid="new") == "ok"
        assert 'id = "loop"' in saved.read_text()
        assert "already exists" in add(d, "d1", "239.1.1.9", 5000, "239.2.2.5:5000:d1", rid="loop")
        # A refused rule still owns its input: another rule for it would clash once allowed.
        assert add(d, "d0", "239.1.1.5", 5000, "239.2.2.6:5000:d1", rid="twin") == (
            "mcrelay: rule 'out' (refused) already names 239.1.1.5:5000 on d0\n"
        )
        d.ok("remove", "loop")
        assert 'id = "loop"' not in saved.read_text()
        assert sorted(r["id"] for r in json.loads(d.ok("rules", "--json"))) == [
            "fine",
            "new",
            "out",
        ]


def test_a_config_file_rule_the_policy_refuses_is_loaded_as_refused(
    ns: topology.Netns, tmp: Path
) -> None:
    config = tmp / "rules.toml"
    config.write_text(
        '[[rule]]\nid = "dns"\ninput-interface = "lo"\ninput-group = "127.0.0.53"\n'
        'input-port = 53\noutputs = ["10.200.6.9:53:d1"]\n'
    )
    for d in start(ns, tmp, "--config", str(config)):
        (listed,) = json.loads(d.ok("rules", "--json"))
        assert (listed["id"], listed["state"]) == ("dns", "refused")
        assert d.workers()["data-0"]["rules"] == 0
