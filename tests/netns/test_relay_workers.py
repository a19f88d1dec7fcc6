"""Real packets through a real relay while its data workers are killed, and run unprivileged:
no datagram is lost when a data worker is killed or hangs (its ring outlives it), counters and
ring drops survive a kill -9, and workers from a private Python hold no privilege over each
other (gen-ns → relay-ns → sink-ns, see tests/lab/relay.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.lab import topology
from tests.lab.daemon import Daemon, as_user_argv, private_python, wait_for
from tests.lab.relay import gen, relay_daemon, run_gen, sink
from tests.netns.relaying import GROUP, OUT_GROUP, OUT_PORT, PORT, add, stats

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not topology.have_netns(), reason="needs root and ip netns"),
]


#: Datagrams that may arrive twice after a kill: the frames of the block the killed worker had
#: half sent, which its replacement relays again (a block closes after 2 ms: 40 at 20k pps).
ONE_BLOCK_AT_20K = 200


def _kill_mid_stream(
    chain: topology.Chain, relay: Daemon, victim_id: str, rate: int, count: int, sig: signal.Signals
) -> tuple[dict[str, object], float]:
    """Stream ``count`` datagrams at ``rate``, send ``sig`` to a worker a third of the way in;
    the sink's report and how long until a replacement ran."""  # fmt: skip
    with sink(chain.sink, OUT_GROUP, OUT_PORT, chain.sink_if, "--idle-timeout", "2") as s:
        stream = gen(chain.gen, GROUP, PORT, "--rate", str(rate), "--count", str(count))
        try:
            time.sleep(count / rate / 3)  # mid-stream: the stream itself is the clock here
            victim = relay.workers()[victim_id]["pid"]
            t0 = time.monotonic()
            os.kill(victim, sig)
            relay.wait_replaced(victim_id, victim, timeout=5, poll=0.005)
            took = time.monotonic() - t0
        finally:
            stream.communicate(timeout=30)
        assert stream.returncode == 0
        return s.result(), took


def _nothing_lost(report: dict[str, object], count: int) -> None:
    duplicated = int(report["duplicated"])  # type: ignore[call-overload]
    assert report["lost"] == 0, report
    assert int(report["received"]) - duplicated == count, report  # type: ignore[call-overload]
    assert duplicated <= ONE_BLOCK_AT_20K, report


def test_kill_of_the_only_data_worker_at_20k_pps_loses_nothing(
    chain: topology.Chain, tmp_path: Path
) -> None:
    """The ring outlives the killed worker: what arrives meanwhile waits in it, and the
    replacement (forked at once by the spawner: a first failure has no backoff) relays it."""
    with relay_daemon(chain.relay, tmp_path, "--num-workers", "1") as relay:
        add(relay, chain, f"{OUT_GROUP}:{OUT_PORT}:{chain.relay_out}")
        wait_for(lambda: relay.workers()["data-0"]["rules"] == 1)
        report, took = _kill_mid_stream(chain, relay, "data-0", 20_000, 30_000, signal.SIGKILL)
    print(f"\nkill -9 of the only data worker at 20k pps: replaced in {took * 1000:.0f} ms, "
          f"lost {report['lost']}, duplicated {report['duplicated']}")  # fmt: skip
    assert took < 1.0
    _nothing_lost(report, 30_000)


def test_kill_one_of_two_data_workers_at_20k_pps_loses_nothing(
    chain: topology.Chain, relay: Daemon
) -> None:
    """One flow hashes to one worker; whichever carries it, its share waits in its ring (the
    fanout member stays) until the replacement reads it."""
    add(relay, chain, f"{OUT_GROUP}:{OUT_PORT}:{chain.relay_out}")
    wait_for(lambda: all(w["rules"] == 1 for w in relay.workers().values() if w["kind"] == "data"))
    for victim in ("data-0", "data-1"):
        report, took = _kill_mid_stream(chain, relay, victim, 20_000, 20_000, signal.SIGKILL)
        print(f"\nkill -9 of {victim} of two at 20k pps: replaced in {took * 1000:.0f} ms, "
              f"lost {report['lost']}, duplicated {report['duplicated']}")  # fmt: skip
        assert took < 1.0
        _nothing_lost(report, 20_000)
    assert relay.workers()["data-0"]["rules"] == 1


def test_stopped_data_worker_is_replaced_within_a_second_and_its_traffic_delayed_not_lost(
    chain: topology.Chain, tmp_path: Path
) -> None:
    """A SIGSTOPped data worker misses its 0.3 s heartbeat: it is killed and replaced, and the
    replacement relays what waited in the ring meanwhile."""
    with relay_daemon(chain.relay, tmp_path, "--num-workers", "1") as relay:
        add(relay, chain, f"{OUT_GROUP}:{OUT_PORT}:{chain.relay_out}")
        wait_for(lambda: relay.workers()["data-0"]["rules"] == 1)
        old = relay.workers()["data-0"]["pid"]
        try:
            report, took = _kill_mid_stream(chain, relay, "data-0", 5_000, 10_000, signal.SIGSTOP)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(old, signal.SIGCONT)  # killed as hung by now, normally
    print(f"\nSIGSTOP of the only data worker at 5k pps: replaced in {took * 1000:.0f} ms, "
          f"lost {report['lost']}, duplicated {report['duplicated']}")  # fmt: skip
    assert took < 1.0
    _nothing_lost(report, 10_000)


def test_counters_survive_a_worker_kill(chain: topology.Chain, relay: Daemon) -> None:
    add(relay, chain, f"{OUT_GROUP}:{OUT_PORT}:{chain.relay_out}")
    with sink(chain.sink, OUT_GROUP, OUT_PORT, chain.sink_if, "--count", "3000",
              "--idle-timeout", "2") as s:  # fmt: skip
        run_gen(chain.gen, GROUP, PORT, "--rate", "10000", "--count", "3000")
        assert s.result()["received"] == 3000
    wait_for(lambda: stats(relay)["rules"][0]["packets_in"] == 3000)
    for w in relay.workers().values():
        if w["kind"] == "data":
            os.kill(w["pid"], signal.SIGKILL)
            relay.wait_replaced(w["id"], w["pid"])
    assert stats(relay)["rules"][0]["packets_in"] == 3000


def _udp_delivered(pid: int) -> int:
    """UDP datagrams delivered to sockets in the network namespace process ``pid`` is in."""
    with open(f"/proc/{pid}/net/snmp") as f:
        header, values = (line.split() for line in f if line.startswith("Udp:"))
    return int(values[header.index("InDatagrams")])


def test_stats_after_a_kill_mid_stream_equal_what_the_sink_received(
    chain: topology.Chain, tmp_path: Path
) -> None:
    """The worker is killed while it relays, between two of its once-a-second pushes: the
    counts it made since the last one must reach `stats` all the same."""
    with relay_daemon(chain.relay, tmp_path, "--num-workers", "1") as relay:
        add(relay, chain, f"{OUT_GROUP}:{OUT_PORT}:{chain.relay_out}")
        victim = relay.workers()["data-0"]["pid"]
        with sink(chain.sink, OUT_GROUP, OUT_PORT, chain.sink_if, "--count", "6000",
                  "--idle-timeout", "2") as s:  # fmt: skip
            before = _udp_delivered(s.proc.pid)
            stream = gen(chain.gen, GROUP, PORT, "--rate", "10000", "--count", "5000")
            try:
                # Mid-stream, by what the sink has: 1,000 of the 5,000 relayed.
                wait_for(lambda: _udp_delivered(s.proc.pid) - before >= 1000, 10, 0.001)
                os.kill(victim, signal.SIGKILL)
                relayed_by_victim = _udp_delivered(s.proc.pid) - before
            finally:
                stream.communicate(timeout=30)
            assert stream.returncode == 0
            relay.wait_replaced("data-0", victim)
            run_gen(chain.gen, GROUP, PORT, "--rate", "10000", "--count", "1000")
            received = s.result()["received"]

        def settled() -> tuple[int, int] | None:
            (rule,) = stats(relay)["rules"]  # type: ignore[misc]
            counted = (rule["packets_in"], rule["outputs"][0]["packets"])
            return counted if counted == (received, received) else None

        print(f"\nkill -9 mid-stream: sink received {received}, the killed worker had relayed "
              f"about {relayed_by_victim} of 5000")  # fmt: skip
        assert received == 6000  # what arrived while no worker read waited in the ring
        try:
            wait_for(settled, timeout=5)
        except AssertionError:
            (rule,) = stats(relay)["rules"]  # type: ignore[misc]
            raise AssertionError(
                f"sink received {received}, stats count {rule['packets_in']} in and "
                f"{rule['outputs'][0]['packets']} out"
            ) from None


def test_ring_drops_of_a_killed_worker_reach_stats(chain: topology.Chain, tmp_path: Path) -> None:
    """A stopped worker's ring overflows and it is killed before it can report: the drops the
    kernel counted since its last report reach `stats` all the same (its replacement, which
    takes over the same capture socket, reads them). The heartbeat timeout is long here, so
    the stopped worker is not replaced before its ring overflows."""
    sent = 40_000  # 2 s at 20k pps: the ring holds about 1 s
    args = ("--num-workers", "1", "--data-heartbeat-timeout", "30")
    with relay_daemon(chain.relay, tmp_path, *args) as relay:
        add(relay, chain, f"{OUT_GROUP}:{OUT_PORT}:{chain.relay_out}")
        # `add` waits for the worker's ack only so long: stop it once it holds the rule
        victim = wait_for(lambda: (w := relay.workers()["data-0"])["rules"] == 1 and w["pid"])
        os.kill(victim, signal.SIGSTOP)
        try:
            run_gen(chain.gen, GROUP, PORT, "--rate", "20000", "--count", str(sent))
        finally:
            os.kill(victim, signal.SIGKILL)
        relay.wait_replaced("data-0", victim)
        # The ring holds 512 blocks, each closed after 2 ms: about 20,000 frames at 20k pps.
        drops = wait_for(lambda: (k := int(stats(relay)["kernel_drops"])) > 0 and k, 5)  # type: ignore[call-overload]
        print(f"\n{sent} datagrams to a stopped, then killed worker: {drops} ring drops counted")
        assert sent // 4 <= drops <= sent


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


#: As another user: try to ptrace-attach to and to signal (signal 0: a permission check only)
#: each pid given; prints one "pid attach-errno kill-errno" line per pid (0 = it worked).
PROBE = r"""
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for pid in map(int, sys.argv[1:]):
    attached = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
    attach_err = 0 if attached == 0 else ctypes.get_errno()
    if attached == 0:
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
    try:
        os.kill(pid, 0)
        kill_err = 0
    except OSError as exc:
        kill_err = exc.errno
    print(pid, attach_err, kill_err)
"""


def _probe(uid: int, gid: int, *pids: int) -> dict[int, tuple[int, int]]:
    out = subprocess.run(
        as_user_argv(uid, gid, [], PROBE, *map(str, pids)),
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    return {int(p): (int(a), int(k)) for p, a, k in (line.split() for line in out.splitlines())}


def test_workers_relay_without_privileges_from_a_private_python(
    chain: topology.Chain, tmp_path: Path
) -> None:
    """Workers drop everything themselves, also when only root can read the interpreter (a venv
    inside a 0700 directory, like a Python under /root): not root, no capabilities,
    no_new_privs, not dumpable, control and data under different uids that can neither trace
    nor signal each other, and packets still relayed."""
    with (
        private_python() as python,
        relay_daemon(chain.relay, tmp_path, "--num-workers", "2", python=python) as relay,
    ):
        add(relay, chain, f"{OUT_GROUP}:{OUT_PORT}:{chain.relay_out}")
        with sink(chain.sink, OUT_GROUP, OUT_PORT, chain.sink_if, "--count", "1000",
                  "--idle-timeout", "2") as s:  # fmt: skip
            run_gen(chain.gen, GROUP, PORT, "--rate", "10000", "--count", "1000")
            assert s.result()["received"] == 1000
        workers = relay.workers()
        uids: dict[str, tuple[int, int]] = {}
        for worker in workers.values():
            pid = worker["pid"]
            status = _status(pid)
            uid, gid = int(status["Uid"].split()[0]), int(status["Gid"].split()[0])
            assert uid != 0, worker["id"]
            assert status["Uid"].split() == [str(uid)] * 4  # real, effective, saved, fs
            assert int(status["CapEff"], 16) == 0
            assert int(status["CapPrm"], 16) == 0
            assert int(status["CapBnd"], 16) == 0
            assert status["NoNewPrivs"].strip() == "1"
            # Not dumpable: the kernel gives the task's /proc files to root (the /proc/PID
            # directory itself keeps the euid, by design, so ps can show the user).
            for entry in ("fd", "mem", "environ", "status"):
                assert os.stat(f"/proc/{pid}/{entry}").st_uid == 0, f"{worker['id']} {entry}"
            uids[worker["id"]] = (uid, gid)
        assert _status(relay.proc.pid)["Uid"].split()[0] == "0"
        control = workers["control"]["pid"]
        data = [w["pid"] for k, w in workers.items() if k.startswith("data-")]
        assert uids["control"][0] not in {uids[k][0] for k in workers if k.startswith("data-")}
        eperm = (errno.EPERM, errno.EPERM)
        # The data workers' user can neither trace nor signal the control worker, nor (not
        # dumpable) trace a data worker of its own uid; and the other way round.
        as_data = _probe(*uids["data-0"], control, *data)
        assert as_data[control] == eperm
        assert all(as_data[pid][0] == errno.EPERM for pid in data)
        as_control = _probe(*uids["control"], control, *data)
        assert all(as_control[pid] == eperm for pid in data)
        assert as_control[control][0] == errno.EPERM
