"""Rules follow their input interface as it appears, goes down, comes back and disappears."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.lab import topology
from tests.lab.daemon import Daemon, wait_for
from tests.lab.relay import relay_daemon, run_gen, sink

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
]

GROUP, PORT, OUT = "239.9.1.1", 5000, "239.2.9.9"


def state(d: Daemon) -> str:
    (rule,) = json.loads(d.ok("rules", "--json"))
    return str(rule["state"])


def relayed(c: topology.Chain, count: int = 1000) -> int:
    with sink(c.sink, OUT, PORT, c.sink_if, "--count", str(count), "--idle-timeout", "2") as s:
        run_gen(c.gen, GROUP, PORT, "--interface", "gen9", "--rate", "10000", "--count", str(count))
        return int(s.result()["received"])


def test_rule_follows_its_interface(chain: topology.Chain, tmp_path: Path) -> None:
    with relay_daemon(chain.relay, tmp_path, "--num-workers", "2") as d:
        d.ok("add", "--input-interface", "rin9", "--input-group", GROUP, "--input-port",
             str(PORT), "--output", f"{OUT}:{PORT}:{chain.relay_out}")  # fmt: skip
        assert state(d) == "unresolved"

        topology.veth(chain.gen, "gen9", "10.200.90.1/24", chain.relay, "rin9", "10.200.90.2/24")
        wait_for(lambda: state(d) == "active")
        assert relayed(chain) == 1000

        # One capture socket per data worker (each says so once it has mapped its ring).
        captures = wait_for(lambda: d.log.read_text().count("capturing on rin9") == 2 and 2)
        chain.relay.ip("link", "set", "rin9", "down")
        wait_for(lambda: state(d) == "paused")
        chain.relay.ip("link", "set", "rin9", "up")
        wait_for(lambda: state(d) == "active")
        assert relayed(chain) == 1000
        # The same interface back: its capture sockets (and what waits in their rings) are kept.
        assert "input interface rin9 is up again: capturing" in d.log.read_text()
        assert d.log.read_text().count("capturing on rin9") == captures

        chain.gen.ip("link", "del", "gen9")  # takes its peer rin9 with it
        wait_for(lambda: state(d) == "unresolved")
        assert all(w["restarts"] == 0 for w in d.workers().values())


def packets_in(d: Daemon) -> int:
    (rule,) = json.loads(d.ok("stats", "--json"))["rules"]
    return int(rule["packets_in"])


def ifindex(ns: topology.Netns, name: str) -> int:
    (link,) = json.loads(ns.ip("-j", "link", "show", name))
    return int(link["ifindex"])


def recreate_veth(
    ns: topology.Netns, name: str, addr: str, peer_ns: topology.Netns, peer: str, tmp: Path
) -> None:
    """Delete veth ``name`` and create it again, up with carrier (its peer is created up), in
    one `ip -batch`: a few ms, and the new interface has a new index."""
    before = ifindex(ns, name)
    batch = tmp / f"recreate-{name}.ip"
    batch.write_text(
        f"link del {name}\n"
        f"link add {peer} netns {peer_ns.name} up type veth peer name {name}\n"
        f"link set {name} up\n"
        f"addr add {addr} dev {name}\n"
    )
    ns.ip("-batch", str(batch))
    assert ifindex(ns, name) != before


def until_grows(read: Callable[[], int], burst: Callable[[], None], what: str) -> None:
    """Bounded bursts of traffic until ``read()`` grows (counters arrive once a second)."""
    deadline = time.monotonic() + 6
    while True:
        seen = read()
        burst()
        settle = time.monotonic() + 1.5
        while time.monotonic() < settle:
            if read() > seen:
                return
            time.sleep(0.05)
        assert time.monotonic() < deadline, what


def test_input_interface_recreated_between_two_events(
    chain: topology.Chain, tmp_path: Path
) -> None:
    """Deleted and created again under the same name within milliseconds, so the link monitor
    may see it up before and up after: the capture sockets and the membership must move to the
    new interface all the same."""
    c = chain
    with relay_daemon(c.relay, tmp_path, "--num-workers", "2") as d:
        topology.veth(c.gen, "gen9", "10.200.90.1/24", c.relay, "rin9", "10.200.90.2/24")
        d.ok("add", "--input-interface", "rin9", "--input-group", GROUP, "--input-port",
             str(PORT), "--output", f"{OUT}:{PORT}:{c.relay_out}")  # fmt: skip
        wait_for(lambda: state(d) == "active")
        assert relayed(c) == 1000
        wait_for(lambda: packets_in(d) == 1000)  # counters are reported once a second

        # The supervisor is held up (SIGSTOP, as if busy or not scheduled) while rin9 goes and
        # comes back: when it reads the queued events, the interface is already up again.
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            recreate_veth(c.relay, "rin9", "10.200.90.2/24", c.gen, "gen9", tmp_path)
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        c.gen.ip("addr", "add", "10.200.90.1/24", "dev", "gen9")

        until_grows(
            lambda: packets_in(d),
            lambda: run_gen(c.gen, GROUP, PORT, "--interface", "gen9", "--count", "50"),
            "the capture did not move to the new rin9",
        )
        assert state(d) == "active"
        assert relayed(c) == 1000
        assert "input interface rin9 was re-created" in d.log.read_text()
        assert all(w["restarts"] == 0 for w in d.workers().values())


def test_output_interface_goes_and_comes_back(chain: topology.Chain, tmp_path: Path) -> None:
    c = chain
    with relay_daemon(c.relay, tmp_path, "--num-workers", "1") as d:
        d.ok("add", "--input-interface", c.relay_in, "--input-group", GROUP, "--input-port",
             str(PORT), "--output", f"{OUT}:{PORT}:{c.relay_out}")  # fmt: skip

        def out_counters() -> dict[str, int]:
            (rule,) = json.loads(d.ok("stats", "--json"))["rules"]
            return dict(rule["outputs"][0])

        c.relay.ip("link", "del", c.relay_out)  # takes sink0 with it
        run_gen(c.gen, GROUP, PORT, "--rate", "5000", "--count", "1000")
        # Every packet that found its output gone is counted as an egress error; nothing crashes.
        assert wait_for(lambda: out_counters()["errors"] == 1000)

        topology.veth(c.relay, c.relay_out, f"{c.relay_out_addr}/24", c.sink, c.sink_if,
                      f"{c.sink_addr}/24")  # fmt: skip
        # The worker retries the output every second and says when it is usable again.
        wait_for(lambda: "output interface rout0 is usable again" in d.log.read_text())
        with sink(c.sink, OUT, PORT, c.sink_if, "--count", "1000", "--idle-timeout", "2") as s:
            run_gen(c.gen, GROUP, PORT, "--rate", "5000", "--count", "1000")
            assert s.result()["received"] == 1000
        assert all(w["restarts"] == 0 for w in d.workers().values())


def test_output_interface_recreated_between_two_sends(
    chain: topology.Chain, tmp_path: Path
) -> None:
    """The output interface deleted and created again within milliseconds: the workers' output
    sockets were bound to the old one; the first send that fails reopens them on the new one."""
    c = chain
    with relay_daemon(c.relay, tmp_path, "--num-workers", "1") as d:
        d.ok("add", "--input-interface", c.relay_in, "--input-group", GROUP, "--input-port",
             str(PORT), "--output", f"{OUT}:{PORT}:{c.relay_out}")  # fmt: skip

        def sent() -> int:
            (rule,) = json.loads(d.ok("stats", "--json"))["rules"]
            return int(rule["outputs"][0]["packets"])

        # `add` waits for the worker's ack only so long: under load, wait for it here
        wait_for(lambda: d.workers()["data-0"]["rules"] == 1)
        run_gen(c.gen, GROUP, PORT, "--count", "100")
        wait_for(lambda: sent() == 100)
        recreate_veth(c.relay, c.relay_out, f"{c.relay_out_addr}/24", c.sink, c.sink_if, tmp_path)
        c.sink.ip("addr", "add", f"{c.sink_addr}/24", "dev", c.sink_if)

        until_grows(
            sent,
            lambda: run_gen(c.gen, GROUP, PORT, "--count", "50"),
            "the output did not move to the new rout0",
        )
        with sink(c.sink, OUT, PORT, c.sink_if, "--count", "1000", "--idle-timeout", "2") as s:
            run_gen(c.gen, GROUP, PORT, "--rate", "5000", "--count", "1000")
            assert s.result()["received"] == 1000
        assert all(w["restarts"] == 0 for w in d.workers().values())
