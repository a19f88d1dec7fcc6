"""Rules follow their input interface as it appears, goes down, comes back and disappears."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon, wait_for
from tests.netns import topology
from tests.netns.relay import relay_daemon, run_gen, sink

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
]

GROUP, PORT, OUT = "239.9.1.1", 5000, "239.2.9.9"


@pytest.fixture
def chain() -> Iterator[topology.Chain]:
    with topology.chain() as c:
        yield c


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

        chain.relay.ip("link", "set", "rin9", "down")
        wait_for(lambda: state(d) == "paused")
        chain.relay.ip("link", "set", "rin9", "up")
        wait_for(lambda: state(d) == "active")
        assert relayed(chain) == 1000

        chain.gen.ip("link", "del", "gen9")  # takes its peer rin9 with it
        wait_for(lambda: state(d) == "unresolved")
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
