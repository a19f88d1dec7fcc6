"""A stopped or dying worker against a real daemon: nothing wedges, and changes apply everywhere
or nowhere (issue: hung workers with a full channel, half-applied changes).

A data worker stopped with SIGSTOP cannot read its socketpair, so a ~1 MiB rule change fills the
channel. The supervisor must still notice the worker within the heartbeat timeout (+1 s), replace
and resync it, keep answering other clients, and stop on SIGTERM within the stop timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from mcrelay import client, config
from mcrelay import rules as rules_mod
from mcrelay.ipc import messages as m
from mcrelay.rules import Output, Rule, RuleInput
from tests.lab.daemon import Daemon, daemon, pid_alive, wait_for

#: 2,200 rules x 8 outputs: a ReplaceRules of about 0.95 MiB, just under the client frame limit.
BIG = 2200
ONE_RULE = ["--input-interface", "in0", "--input-port", "5000", "--output", "239.9.9.9:6000:o"]


def rule_set(tag: str, n: int = BIG, outputs: int = 8) -> tuple[Rule, ...]:
    # Unicast inputs on a missing interface: no memberships, no capture, only table work.
    return tuple(
        Rule(
            id=f"{tag}-{k:05d}",
            input=RuleInput(interface="in0", group=f"10.50.{k // 250}.{k % 250 + 1}", port=7000),
            outputs=tuple(
                Output(group="239.78.0.1", port=7000 + j, interface="out0") for j in range(outputs)
            ),
        )
        for k in range(n)
    )


def table(d: Daemon) -> tuple[Rule, ...]:
    listed = client.call(d.socket, m.ListRules(), timeout=15)
    return tuple(
        msgspec.convert({k: v for k, v in r.items() if k != "state"}, Rule) for r in listed
    )


def consistent(d: Daemon) -> tuple[str, int] | None:
    """(digest, count) when every data worker holds exactly the daemon's listed rule set."""
    rules = table(d)
    digest = rules_mod.digest(rules)
    workers = [w for w in d.workers().values() if w["kind"] == "data"]
    if all(
        w["state"] == "running" and w["rules"] == len(rules) and w["digest"] == digest
        for w in workers
    ):
        return digest, len(rules)
    return None


class Background:
    """A client request in a thread, so the test can act while it is in flight."""

    def __init__(self, socket: Path, request: m.ClientRequest, timeout: float = 20) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(socket, request, timeout))
        self._thread.start()

    def _run(self, socket: Path, request: m.ClientRequest, timeout: float) -> None:
        try:
            self.result = client.call(socket, request, timeout=timeout)
        except BaseException as exc:  # reported by join()
            self.error = exc
        self.done_at = time.monotonic()

    def join(self, timeout: float) -> Background:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the request did not finish"
        return self


def test_stopped_worker_with_1mib_load_in_flight_is_replaced_within_timeout_plus_1s(
    tmp_path: Path,
) -> None:
    timeout = 1.0
    with daemon(tmp_path, "--num-workers", "2", "--heartbeat-timeout", str(timeout)) as d:
        d.wait_running()
        # The stop lands at different points of the push: before it, while the supervisor
        # saves the table, and while it writes the 1 MiB update into the worker's channel.
        for i, offset in enumerate((0.0, 0.05, 0.1, 0.15, 0.2)):
            stopped = d.workers()["data-0"]["pid"]
            loader = Background(d.socket, m.ReplaceRules(rules=rule_set("ab"[i % 2])))
            time.sleep(offset)
            os.kill(stopped, signal.SIGSTOP)
            t0 = time.monotonic()
            # Other clients keep being answered while the worker is stuck.
            slowest = 0.0
            while pid_alive(stopped):
                t = time.monotonic()
                assert t - t0 < timeout + 1.0, f"data-0 still there after {t - t0:.2f} s"
                client.call(d.socket, m.Ping(), timeout=5)
                slowest = max(slowest, time.monotonic() - t)
                time.sleep(0.02)
            detected = time.monotonic() - t0
            print(f"stop at +{offset:.2f} s: detected after {detected:.2f} s, "
                  f"slowest ping {slowest:.3f} s")  # fmt: skip
            assert slowest < 1.0
            loader.join(15)
            assert loader.error is None, loader.error
            assert len(loader.result["added"]) == BIG
            _, count = wait_for(lambda: consistent(d), timeout=10)
            assert count == BIG
            assert d.workers()["data-0"]["pid"] != stopped
        # Rule changes are not wedged: a new one is made at once, and everywhere.
        t = time.monotonic()
        d.ok("add", "--input-group", "239.1.1.1", *ONE_RULE, "--id", "after")
        print(f"add after the replacements took {time.monotonic() - t:.2f} s")
        _, count = wait_for(lambda: consistent(d), timeout=10)
        assert count == BIG + 1


def test_sigterm_stops_a_daemon_whose_worker_is_stopped_with_a_full_channel(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "rules.toml"
    cfg.write_text(config.dump(rule_set("c", n=1, outputs=1)))
    with daemon(tmp_path, "--num-workers", "2", "--config", str(cfg)) as d:
        workers = d.wait_running()
        stopped = workers["data-0"]["pid"]
        os.kill(stopped, signal.SIGSTOP)
        loads = [Background(d.socket, m.ReplaceRules(rules=rule_set(t))) for t in ("a", "b")]
        wait_for(lambda: len(table(d)) == BIG, timeout=10)  # the first load is being pushed
        adder = Background(d.socket, m.AddRule(rule=rule_set("x", n=1, outputs=1)[0]), timeout=20)
        d.proc.send_signal(signal.SIGHUP)  # a reload that must wait for the rule-change lock
        time.sleep(0.1)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        status = d.proc.wait(timeout=10)
        took = time.monotonic() - t0
        print(f"SIGTERM with a stopped worker and a full channel: exit {status} in {took:.2f} s")
        assert status == 0, d.log.read_text()[-3000:]
        assert took < 3.0  # stop grace (1 s) per worker, in parallel, and reaping
        assert not d.socket.exists()
        for w in workers.values():
            wait_for(lambda pid=w["pid"]: not pid_alive(pid), timeout=2)
        for request in (*loads, adder):
            request.join(25)


def test_killing_the_control_worker_mid_load_applies_everywhere_or_nowhere(
    tmp_path: Path,
) -> None:
    sets = {"a": rule_set("a"), "b": rule_set("b")}
    hits = 0
    # Each kill is a failure: a short backoff cap keeps the replacements quick.
    with daemon(tmp_path, "--num-workers", "2", "--backoff-max", "0.5") as d:
        d.wait_running()
        # Delays after sending the load: early ones kill it before it reaches the supervisor,
        # later ones while the supervisor saves and pushes it.
        for i, delay in enumerate((0.05, 0.15, 0.25, 0.35, 0.5, 0.7, 0.9, 1.2)):
            before = consistent(d)
            assert before is not None
            tag = "ab"[i % 2]
            control = d.workers()["control"]["pid"]
            loader = Background(d.socket, m.ReplaceRules(rules=sets[tag]))
            time.sleep(delay)
            with contextlib.suppress(ProcessLookupError):
                os.kill(control, signal.SIGKILL)
            loader.join(25)
            d.wait_replaced("control", control)
            # Applied everywhere (table, state file, every worker) or nowhere.
            digest, count = wait_for(lambda: consistent(d), timeout=10)
            state = tmp_path / "state" / "rules.toml"
            saved = config.load(state) if state.exists() else ()
            assert rules_mod.digest(saved) == digest
            if digest == rules_mod.digest(sets[tag]):
                hits += loader.error is not None  # applied although its client was cut off
            else:
                assert (digest, count) == before, "a change was half applied"
        print(f"{hits} of 8 loads were applied after their control worker was killed")


def test_state_dir_sync_failure_reports_the_change_as_made(tmp_path: Path) -> None:
    fault = tmp_path / "faults"
    fault.write_text("supervisor:state-dir-fsync\n")
    env = {"MCRELAY_FAULT_FILE": str(fault)}
    with daemon(tmp_path, "--num-workers", "1", env=env) as d:
        d.wait_running()
        result = d.cli("add", "--input-group", "239.1.1.1", *ONE_RULE, "--id", "a")
        # The rename happened: the rule is in effect and comes back at restart; say so.
        assert result.returncode == 0, result.stderr
        assert "could not sync" in result.stderr
        assert "nothing changed" not in result.stderr
        assert [r.id for r in table(d)] == ["a"]
        wait_for(lambda: consistent(d))
        second = rule_set("b", n=1, outputs=1)[0]
        result = client.call(d.socket, m.AddRule(rule=second))  # what --json shows
        assert result["id"] == second.id
        assert "could not sync" in result["warning"]
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=5) == 0
    with daemon(tmp_path, "--num-workers", "1") as again:
        assert [r.id for r in table(again)] == ["a", second.id]
