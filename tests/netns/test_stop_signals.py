"""Three SIGTERMs 50 ms apart while a 50k pps stream is being relayed: one clean exit."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from mcrelay import client
from mcrelay.ipc import messages as m
from tests.lab import topology
from tests.lab.daemon import Daemon, daemon, wait_for
from tests.lab.relay import gen
from tests.lab.stopping import assert_stopped_cleanly, saved_digest, stop_with

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
]

GROUP, PORT = "239.1.1.1", 5000


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM,) * 3, (signal.SIGINT, signal.SIGTERM, signal.SIGINT)],
    ids=["3xTERM", "INT-TERM-INT"],
)
def test_repeated_stop_signals_during_a_50k_pps_stream(
    chain: topology.Chain, tmp_path: Path, signals: tuple[signal.Signals, ...]
) -> None:
    out = f"239.2.2.2:5001:{chain.relay_out}"
    with daemon(tmp_path, "--num-workers", "2", prefix=tuple(chain.relay.cmd())) as d:
        d.ok("add", "--input-interface", chain.relay_in, "--input-group", GROUP,
             "--input-port", str(PORT), "--output", out)  # fmt: skip
        workers = d.wait_running()
        digest = saved_digest(tmp_path / "state")
        # 3 s at 50k pps at most; the signals come once the stream is flowing through the relay.
        stream = gen(chain.gen, GROUP, PORT, "--rate", "50000", "--count", "150000",
                     "--size", "200")  # fmt: skip
        try:
            wait_for(lambda: relayed(d) > 10_000, timeout=5)
            assert stream.poll() is None, "the stream ended before the signals"
            status = stop_with(d, signals)
        finally:
            stream.kill()
            stream.communicate()
        assert_stopped_cleanly(d, status, workers, tmp_path / "state", digest)


def relayed(d: Daemon) -> int:
    stats = client.call(d.socket, m.GetStats(), timeout=5)
    return sum(o["packets"] for r in stats["rules"] for o in r["outputs"])
