"""The daemon as users run it: real supervisor, real worker processes, real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.daemon import Daemon, cli, daemon, is_worker, pid_alive, wait_for

RULE = ["--input-interface", "in0", "--input-port", "5000", "--output", "239.9.9.9:6000:out0"]


@pytest.fixture
def relay(tmp_path: Path) -> Daemon:
    with daemon(tmp_path, "--num-workers", "2") as d:
        d.wait_running()
        yield d


def test_kill_control_worker_new_pid_within_1s_and_cli_answers(relay: Daemon) -> None:
    old = relay.workers()["control"]["pid"]
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    # The CLI call made during the restart waits in the socket backlog and is served.
    new = relay.wait_replaced("control", old, timeout=1.0)
    assert time.monotonic() - t0 < 1.0
    assert new["restarts"] == 1
    assert relay.ok("ping").strip() == "pong"


def test_replacement_data_worker_holds_every_rule(relay: Daemon) -> None:
    relay.ok("add", "--input-group", "239.1.1.1", *RULE)
    relay.ok("add", "--input-group", "239.1.1.2", *RULE, "--id", "second")
    old = relay.workers()["data-1"]
    assert old["rules"] == 2
    os.kill(old["pid"], signal.SIGKILL)
    new = relay.wait_replaced("data-1", old["pid"])
    assert new["rules"] == 2


def test_kill_all_workers_at_once(relay: Daemon) -> None:
    relay.ok("add", "--input-group", "239.1.1.1", *RULE)
    before = relay.workers()
    for w in before.values():
        os.kill(w["pid"], signal.SIGKILL)
    after = wait_for(
        lambda: (
            (ws := relay.workers())
            and all(
                ws[i]["pid"] != before[i]["pid"] and ws[i]["state"] == "running" for i in before
            )
            and ws
        ),
        timeout=5,
    )
    assert all(w["rules"] == 1 for w in after.values() if w["kind"] == "data")


def test_a_killed_worker_is_replaced_at_once_and_repeated_kills_grow_the_delay(
    relay: Daemon,
) -> None:
    relay.wait_running()
    time.sleep(0.6)  # the workers' runs are stable: the first kill is a first failure
    delays = []
    for _ in range(3):
        old = relay.workers()["data-0"]["pid"]
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        # The next process exists (pid set again) once its backoff is over.
        wait_for(lambda old=old: relay.workers()["data-0"]["pid"] not in (None, old), 10, 0.005)
        delays.append(time.monotonic() - t0)
        relay.wait_running()
    # At once, then 250 ms, 500 ms: each delay at least its backoff, well short of the next one.
    for delay, backoff in zip(delays, (0.0, 0.25, 0.5), strict=True):
        assert backoff <= delay < backoff + 0.2, delays


def test_hang_fault_is_detected_and_restarted(tmp_path: Path) -> None:
    fault = tmp_path / "faults"
    fault.write_text("data:hang\n")
    env = {"MCRELAY_FAULT_FILE": str(fault)}
    with daemon(tmp_path, "--num-workers", "1", "--heartbeat-timeout", "1", env=env) as d:
        first = wait_for(lambda: (w := d.workers()["data-0"])["state"] == "running" and w)
        fault.unlink()  # the replacement starts healthy
        new = d.wait_replaced("data-0", first["pid"], timeout=5)
        assert new["restarts"] == 1
        assert "did not answer a heartbeat" in d.log.read_text()
        assert not pid_alive(first["pid"])


def test_control_crash_on_start_clients_are_served_once_it_heals(tmp_path: Path) -> None:
    fault = tmp_path / "faults"
    fault.write_text("control:crash-on-start\n")
    env = {"MCRELAY_FAULT_FILE": str(fault)}
    with daemon(tmp_path, "--num-workers", "1", env=env, ready=False) as d:
        wait_for(lambda: d.log.read_text().count("exit status 3") >= 2)
        # A client that connects while no control worker exists waits in the backlog...
        client = subprocess.Popen(
            [sys.executable, "-m", "mcrelay", "ping", "--socket", str(d.socket)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        fault.unlink()
        # ...and is answered by the healed worker: no "connection refused".
        out, err = client.communicate(timeout=10)
        assert client.returncode == 0, err
        assert out.strip() == "pong"
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=5) == 0


def test_sigterm_stops_everything_within_2s(tmp_path: Path) -> None:
    with daemon(tmp_path, "--num-workers", "2") as d:
        pids = [w["pid"] for w in d.wait_running().values()]
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=2) == 0
        assert time.monotonic() - t0 < 2.0
        assert not d.socket.exists()
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=1)


def test_sigkill_of_supervisor_leaves_no_orphan_within_1s(tmp_path: Path) -> None:
    with daemon(tmp_path, "--num-workers", "2") as d:
        pids = [w["pid"] for w in d.wait_running().values()]
        d.proc.kill()
        d.proc.wait()
        t0 = time.monotonic()
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=1)
        assert time.monotonic() - t0 < 1.0


def test_second_supervisor_refuses_and_stale_socket_is_replaced(tmp_path: Path) -> None:
    with daemon(tmp_path, "--num-workers", "1") as d:
        second = cli(
            "supervisor", "--control-socket", str(d.socket), "--state-dir", str(tmp_path / "s2")
        )
        assert second.returncode != 0
        assert "another mcrelay supervisor" in second.stderr
        assert "Traceback" not in second.stderr
        assert d.ok("ping").strip() == "pong"  # the first one is unharmed
        d.proc.kill()
        d.proc.wait()
    assert d.socket.exists()  # SIGKILL left a stale socket file behind
    with daemon(tmp_path, "--num-workers", "1") as again:
        assert again.ok("ping").strip() == "pong"


def test_process_names(relay: Daemon) -> None:
    names = {}
    for w in relay.workers().values():
        with open(f"/proc/{w['pid']}/cmdline", "rb") as f:
            names[w["id"]] = f.read().split(b"\0")[0].decode()
    assert names == {
        "control": "mcrelay: control",
        "data-0": "mcrelay: data-0",
        "data-1": "mcrelay: data-1",
    }
    assert all(is_worker(w["pid"]) for w in relay.workers().values())


@pytest.mark.slow
def test_idle_workers_survive_30s_unrestarted(relay: Daemon) -> None:
    """PR_SET_PDEATHSIG is tied to the forking thread: workers must not die when one retires."""
    before = relay.workers()
    deadline = time.monotonic() + 31
    while time.monotonic() < deadline:
        time.sleep(1)  # the subject of this test is the passage of time itself
        assert all(pid_alive(w["pid"]) for w in before.values())
    after = relay.workers()
    assert {i: (w["pid"], w["restarts"], w["state"]) for i, w in after.items()} == {
        i: (w["pid"], 0, "running") for i, w in before.items()
    }


def test_version_mismatch_and_garbage_get_a_clear_error(relay: Daemon) -> None:
    import socket as pysocket
    import struct

    import msgspec

    def exchange(payload: bytes) -> bytes:
        with pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(relay.socket))
            s.sendall(payload)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data

    hello = msgspec.msgpack.encode({"t": "hello", "version": 99, "role": "client"})
    answer = exchange(struct.pack("!I", len(hello)) + hello)
    reply = msgspec.msgpack.decode(answer[4:])
    assert reply["ok"] is False
    assert "client speaks protocol version 99" in reply["error"]
    garbage = exchange(struct.pack("!I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
    assert b"protocol error" in garbage
    oversized = exchange(struct.pack("!I", 50 * 1024 * 1024))
    assert b"exceeds limit" in oversized
    assert relay.ok("ping").strip() == "pong"
    assert relay.workers()["control"]["restarts"] == 0


def test_rules_survive_a_supervisor_sigkill(tmp_path: Path) -> None:
    rule = ["--input-interface", "in0", "--input-port", "5000", "--output", "239.9.9.9:6000:o"]
    with daemon(tmp_path, "--num-workers", "1") as d:
        d.ok("add", "--input-group", "239.1.1.1", *rule, "--id", "a")
        d.ok("add", "--input-group", "239.1.1.2", *rule, "--id", "b")
        d.ok("remove", "a")
        d.proc.kill()
        d.proc.wait()
    with daemon(tmp_path, "--num-workers", "1") as again:
        assert [r["id"] for r in json.loads(again.ok("rules", "--json"))] == ["b"]
        assert again.wait_running()["data-0"]["rules"] == 1


def test_unwritable_state_refuses_the_change(tmp_path: Path) -> None:
    rule = ["--input-interface", "in0", "--input-port", "5000", "--output", "239.9.9.9:6000:o"]
    fault = tmp_path / "faults"
    with daemon(tmp_path, "--num-workers", "1", env={"MCRELAY_FAULT_FILE": str(fault)}) as d:
        d.ok("add", "--input-group", "239.1.1.1", *rule, "--id", "a")
        state = tmp_path / "state"
        saved = (state / "rules.toml").read_text()
        fault.write_text("supervisor:state-write\n")  # writing fails like a full disk
        result = d.cli("add", "--input-group", "239.1.1.2", *rule, "--id", "b")
        assert result.returncode == 1
        assert "cannot save the rule table" in result.stderr
        assert "nothing changed" in result.stderr
        assert [r["id"] for r in json.loads(d.ok("rules", "--json"))] == ["a"]
        assert (state / "rules.toml").read_text() == saved
        assert [p.name for p in state.iterdir()] == ["rules.toml"]  # no temporary left behind
        assert d.workers()["data-0"]["rules"] == 1
        fault.unlink()
        d.ok("add", "--input-group", "239.1.1.2", *rule, "--id", "b")


def test_pin_workers_places_data_workers_on_distinct_cpus(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    with daemon(tmp_path, "--num-workers", "2", "--pin-workers") as d:
        workers = d.wait_running()
        placed = [os.sched_getaffinity(workers[f"data-{i}"]["pid"]) for i in range(2)]
    assert placed == [{cpus[0]}, {cpus[1 % len(cpus)]}]


def test_systemd_notifications(tmp_path: Path) -> None:
    """READY=1 once every worker runs, RELOADING/READY around SIGHUP, STOPPING=1 on SIGTERM."""
    import socket as pysocket

    conf = tmp_path / "rules.toml"
    conf.write_text("")
    with pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(10)
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        with daemon(tmp_path, "--num-workers", "2", "--config", str(conf), env=env) as d:
            seen: list[str] = []

            def until(word: str) -> None:
                while not any(word in m for m in seen):
                    seen.append(notify.recv(4096).decode())

            until("READY=1")
            workers = d.workers()
            assert all(w["state"] == "running" for w in workers.values())
            for w in workers.values():  # the notify socket is the supervisor's alone
                with open(f"/proc/{w['pid']}/environ", "rb") as f:
                    assert b"NOTIFY_SOCKET" not in f.read()
            assert "STATUS=3 workers running, 0 rules" in "\n".join(seen)
            d.proc.send_signal(signal.SIGHUP)
            until("RELOADING=1")
            until("MONOTONIC_USEC=")
            d.proc.send_signal(signal.SIGTERM)
            until("STOPPING=1")
            assert d.proc.wait(timeout=5) == 0


def test_workers_of_a_killed_supervisor_exit_quietly(tmp_path: Path) -> None:
    with daemon(tmp_path, "--num-workers", "2") as d:
        pids = [w["pid"] for w in d.wait_running().values()]
        d.proc.kill()
        d.proc.wait()
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=2)
    assert "Traceback" not in d.log.read_text()
