"""VLAN tags on the input, sent as raw frames from gen-ns: a rule without a VLAN takes untagged
frames only, a rule with `--input-vlan` only its VLAN's, and stacked tags never reach a worker.

Tagged frames are built by `tests.lab.frames` and sent on an AF_PACKET socket in gen-ns,
paced on an absolute schedule and bounded by a count; the veth's receiving side moves the outer
tag into metadata as a real NIC's driver does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab import topology
from tests.lab.daemon import Daemon, wait_for
from tests.lab.relay import gen, relay_daemon, run_gen, sink

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
]

GROUP, PORT = "239.1.1.1", 5000
UNTAGGED_OUT, VLAN_OUT = ("239.2.2.2", 5001), ("239.2.2.3", 5002)

# argv: interface, group, port, count, rate, stream, JSON list of tag stacks (cycled)
SEND = r"""
import json, socket, sys, time
from tests.lab.frames import build_udp_frame, multicast_mac
from mcrelay.cli.traffic.payload import build_payload
ifname, group, port, count, rate, stream = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
stacks = json.loads(sys.argv[7])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
dst = multicast_mac(group)
fixed = stream < 0  # a flood: the same few frames over and over, no sequence numbers
frames = [build_udp_frame(dst_mac=dst, vlan_tags=tags, src="10.200.1.1", dst=group, sport=4000,
                          dport=port, payload=b"f" * 64) for tags in stacks]
start = time.monotonic()
for seq in range(count):
    if seq % 25 == 0:  # bursts of 25: far below the receiving veth's backlog of 1000
        ahead = start + seq / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    tags = stacks[seq % len(stacks)]
    if fixed:
        s.send(frames[seq % len(frames)])
    else:
        s.send(build_udp_frame(dst_mac=dst, vlan_tags=tags, src="10.200.1.1", dst=group,
                               sport=4000, dport=port, payload=build_payload(seq, 256, stream)))
print(count, time.monotonic() - start)
"""


def send_raw(
    chain: topology.Chain, count: int, rate: int, stacks: list[list[int]], stream: int = 0
) -> subprocess.Popen[str]:
    argv = chain.gen.cmd(sys.executable, "-c", SEND, chain.gen_if, GROUP, str(PORT), str(count),
                         str(rate), str(stream), json.dumps(stacks))  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


@pytest.fixture
def relay(chain: topology.Chain, tmp_path: Path) -> Iterator[Daemon]:
    """Two rules for the same group and port on the input: untagged, and VLAN 200."""
    with relay_daemon(chain.relay, tmp_path, "--num-workers", "2") as d:
        common = ["add", "--input-interface", chain.relay_in, "--input-group", GROUP,
                  "--input-port", str(PORT)]  # fmt: skip
        d.ok(*common, "--id", "untagged", "--output", f"{UNTAGGED_OUT[0]}:{UNTAGGED_OUT[1]}:"
             f"{chain.relay_out}")  # fmt: skip
        d.ok(*common, "--input-vlan", "200", "--id", "vlan200",
             "--output", f"{VLAN_OUT[0]}:{VLAN_OUT[1]}:{chain.relay_out}")  # fmt: skip
        yield d


def stats(d: Daemon) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(d.ok("stats", "--json"))
    return result


def packets_in(d: Daemon) -> dict[str, int]:
    return {r["id"]: r["packets_in"] for r in stats(d)["rules"]}


def test_rules_list_their_vlan(relay: Daemon) -> None:
    inputs = {r["id"]: r["input"] for r in json.loads(relay.ok("rules", "--json"))}
    assert (inputs["untagged"]["vlan"], inputs["vlan200"]["vlan"]) == (None, 200)
    assert "vlan 200" in relay.ok("rules")
    refused = relay.cli("add", "--input-interface", "x", "--input-group", GROUP, "--input-port",
                        "1", "--input-vlan", "4095", "--output", "239.9.9.9:1:y")  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == ["mcrelay: input vlan: 4095 is outside 1-4094"]


def test_each_rule_relays_only_its_own_vlan(chain: topology.Chain, relay: Daemon) -> None:
    with (
        sink(chain.sink, *UNTAGGED_OUT, chain.sink_if, "--count", "1000", "--idle-timeout", "2",
             "--expect-size", "256") as untagged,
        sink(chain.sink, *VLAN_OUT, chain.sink_if, "--count", "1500", "--idle-timeout", "2",
             "--expect-size", "256") as tagged,
    ):  # fmt: skip
        # VLAN 200 (priority bits set: ignored), then VLAN 300, which no rule names, then
        # untagged traffic from `mcrelay gen`.
        finish(send_raw(chain, 1500, 5000, [[0xA000 | 200]], stream=2))
        finish(send_raw(chain, 700, 5000, [[300]], stream=3))
        run_gen(chain.gen, GROUP, PORT, "--rate", "5000", "--count", "1000", "--size", "256")
        got_untagged, got_tagged = untagged.result(), tagged.result()
    print("untagged sink streams:", got_untagged["streams"], "VLAN 200:", got_tagged["streams"])
    assert set(got_untagged["streams"]) == {"0"}  # gen's stream only
    assert set(got_tagged["streams"]) == {"2"}  # VLAN 200's only
    assert (got_untagged["received"], got_untagged["lost"], got_untagged["corrupted"]) == (
        1000,
        0,
        0,
    )
    assert (got_tagged["received"], got_tagged["lost"], got_tagged["corrupted"]) == (1500, 0, 0)
    counted = wait_for(
        lambda: (p := packets_in(relay)) == {"untagged": 1000, "vlan200": 1500} and p
    )
    print("packets_in:", counted, "drops:", stats(relay)["drops"])


def test_tagged_frames_for_a_rule_without_vlan_are_counted_not_relayed(
    chain: topology.Chain, relay: Daemon
) -> None:
    """VLAN 200 has a rule, but for another port: the frames reach the worker, match nothing."""
    relay.ok("remove", "vlan200")
    relay.ok("add", "--input-interface", chain.relay_in, "--input-group", GROUP, "--input-port",
             str(PORT + 1), "--input-vlan", "200", "--output",
             f"{VLAN_OUT[0]}:{VLAN_OUT[1]}:{chain.relay_out}")  # fmt: skip
    with sink(chain.sink, *UNTAGGED_OUT, chain.sink_if, "--count", "500",
              "--idle-timeout", "2") as untagged:  # fmt: skip
        finish(send_raw(chain, 500, 5000, [[200]], stream=2))
        run_gen(chain.gen, GROUP, PORT, "--rate", "5000", "--count", "500")
        report = untagged.result()
    assert (report["received"], report["lost"]) == (500, 0)
    # Each worker reports its counts once a second: the drops and the rule's input may come
    # from different workers, so wait until both have reported.
    seen = wait_for(
        lambda: (
            (s := stats(relay))["drops"].get("no_rule", 0) >= 500
            and {r["id"]: r["packets_in"] for r in s["rules"]}["untagged"] >= 500
            and s
        )
    )
    print("drops:", seen["drops"])
    assert seen["drops"]["no_rule"] == 500
    assert {r["id"]: r["packets_in"] for r in seen["rules"]}["untagged"] == 500


# 2 to 8 tags, 802.1ad and 802.1Q outermost, the outer one of VLAN 200 (a rule names it) or not.
STACKS = [
    [0x88A80000 | 200, 100],
    [200, 200],
    [0x88A80000 | 200, 200, 300],
    [200] * 8,
    [0x88A80000 | 7, 0x88A80000 | 200, 200, 0],
    [0, 0],  # priority tags only
]
FLOOD = 100_000  # 2 s at 50k pps


def test_a_stacked_tag_flood_costs_a_valid_stream_nothing(
    chain: topology.Chain, relay: Daemon
) -> None:
    with sink(chain.sink, *UNTAGGED_OUT, chain.sink_if, "--count", "10000",
              "--idle-timeout", "3") as s:  # fmt: skip
        flood = send_raw(chain, FLOOD, 50_000, STACKS, stream=-1)
        valid = gen(chain.gen, GROUP, PORT, "--rate", "5000", "--count", "10000")
        flooded = finish(flood)
        finish(valid)
        report = s.result()
    print("flood sender (frames, seconds):", flooded.strip(), "valid sink:", report["streams"])
    assert (report["received"], report["lost"], report["duplicated"]) == (10000, 0, 0)
    counted = wait_for(lambda: (p := packets_in(relay))["untagged"] == 10000 and p)
    drops = stats(relay)["drops"]
    print("packets_in:", counted, "drops:", drops)
    # The kernel filter kept the whole flood out: not one stacked frame reached a worker.
    assert counted == {"untagged": 10000, "vlan200": 0}
    assert sum(drops.values()) == 0, drops
    assert all(w["restarts"] == 0 for w in relay.workers().values())
