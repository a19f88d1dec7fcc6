"""The systems under test of scripts/bench (the generator's ceiling, kernel forwarding, socat,
mcrelay with 1 or 2 workers, and a holder of the input), each started and ended by PID in
the test bed of `tests.lab.bench.topology`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mcrelay import client
from mcrelay import rules as rules_mod
from mcrelay.ipc import messages as m
from tests.lab.bench.topology import (
    GEN_ADDR,
    IN_GROUP,
    IN_PORT,
    OUT_GROUP,
    OUT_PORT,
    PY,
    RELAY_OUT_ADDR,
    ROOT,
    SOCAT_BIG_RCVBUF,
    TRAFFIC,
    Topo,
    cpu_list,
)
from tests.lab.processes import poll
from tests.lab.topology import Netns


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace`; only this Popen's own PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_until(pred: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    value = poll(pred, timeout, interval)
    if not value:
        raise RuntimeError(f"timed out waiting for {what}")
    return value


def ctl(path: Path, req: Any, timeout: float = 20.0) -> Any:
    return client.call(path, req, timeout)


# ---------------------------------------------------------------- systems


class System:
    """One relay (or none) in a topology; `start` is a context manager."""

    name = "?"
    label = "?"
    relays = True  # False: the generator ceiling, nothing in between

    def __init__(self) -> None:
        self.topo: Topo | None = None
        self.info: dict[str, Any] = {}

    # where the generator sends and the sink listens
    gen_if = "gen0"
    sink_if = "sink0"

    def out_groups(self) -> list[str]:
        return [OUT_GROUP]

    def pids(self) -> list[int]:
        return []

    def counters(self) -> dict[str, int]:
        """Cumulative drop/forward counters; the driver reports per-run differences."""
        return {}

    @contextlib.contextmanager
    def start(self, topo: Topo) -> Iterator[System]:
        self.topo = topo
        yield self

    def taskset(self) -> list[str]:
        assert self.topo is not None
        return ["taskset", "-c", cpu_list(self.topo.placement.relay_cpus)]


class Ceiling(System):
    name = "gen-ceiling"
    label = "generator → sink (no relay)"
    relays = False
    gen_if = "gdir0"
    sink_if = "sdir0"

    def out_groups(self) -> list[str]:
        return [IN_GROUP]


def _udp_snmp(ns: Netns) -> dict[str, int]:
    lines = [ln.split() for ln in ns.run("cat", "/proc/net/snmp").splitlines() if ln[:4] == "Udp:"]
    if len(lines) < 2:
        return {}
    stats = dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=False))
    keep = ("InDatagrams", "RcvbufErrors", "SndbufErrors", "InErrors", "OutDatagrams")
    return {f"udp_{k}": stats[k] for k in keep if k in stats}


class Kernel(System):
    """Kernel multicast forwarding: a static (S,G) route rin0 → rout0 installed by smcrouted."""

    name = "kernel"
    label = "kernel forwarding (smcroute)"

    def __init__(self) -> None:
        super().__init__()
        self.proc: subprocess.Popen[bytes] | None = None

    def out_groups(self) -> list[str]:
        return [IN_GROUP]  # kernel routing keeps the group and port

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []  # control only: forwarding is softirq work

    def counters(self) -> dict[str, int]:
        assert self.topo is not None
        out: dict[str, int] = {}
        rows = self.topo.relay.run("cat", "/proc/net/ip_mr_cache").splitlines()[1:]
        # Group Origin Iif Pkts Bytes Wrong Oifs
        out["mfc_packets"] = sum(int(r.split()[3]) for r in rows if len(r.split()) > 5)
        out["mfc_wrong_if"] = sum(int(r.split()[5]) for r in rows if len(r.split()) > 5)
        return out

    @contextlib.contextmanager
    def start(self, topo: Topo) -> Iterator[System]:
        self.topo = topo
        topo.relay.sysctl("net.ipv4.ip_forward", "1")
        conf = topo.tmp / "smcroute.conf"
        conf.write_text(
            "phyint rin0 enable\nphyint rout0 enable\n"
            f"mroute from rin0 source {GEN_ADDR} group {IN_GROUP} to rout0\n"
        )
        log = open(topo.tmp / "smcroute.log", "wb")  # noqa: SIM115 (closed below)
        argv = topo.relay.cmd(
            *self.taskset(),
            "smcrouted", "-n", "-N", "-f", str(conf), "-l", "notice",
            "-u", str(topo.tmp / "smcroute.sock"), "-P", str(topo.tmp / "smcroute.pid"),
        )  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(
                lambda: len(topo.relay.run("cat", "/proc/net/ip_mr_cache").splitlines()) > 1,
                10,
                "smcrouted to install the (S,G) route",
            )
            self.info = {
                "mc_forwarding": topo.relay.run(
                    "sysctl", "-n", "net.ipv4.conf.all.mc_forwarding"
                ).strip(),
                "mfc": topo.relay.run("ip", "mroute", "show").strip(),
            }
            yield self
        finally:
            stop_process(self.proc)
            log.close()


class Socat(System):
    """socat relaying one socket to another: recvfrom/sendto, one datagram per system call."""

    def __init__(self, rcvbuf: int | None) -> None:
        super().__init__()
        self.rcvbuf = rcvbuf
        self.name = "socat-8m" if rcvbuf else "socat"
        self.label = "socat, 8 MiB rcvbuf" if rcvbuf else "socat, default buffers"
        self.proc: subprocess.Popen[bytes] | None = None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def counters(self) -> dict[str, int]:
        assert self.topo is not None
        return _udp_snmp(self.topo.relay)

    @contextlib.contextmanager
    def start(self, topo: Topo) -> Iterator[System]:
        self.topo = topo
        recv = f"UDP4-RECV:{IN_PORT},ip-add-membership={IN_GROUP}:rin0,reuseaddr"
        if self.rcvbuf:
            # rcvbuf= is capped at net.core.rmem_max (the kernel then doubles it). Raise that in
            # the relay namespace where the kernel allows it; newer kernels (6.18 here) make it
            # read-only inside a namespace, with the host's value: the effective buffer is then
            # min(rcvbuf, rmem_max) × 2, recorded from `ss` below.
            with contextlib.suppress(subprocess.CalledProcessError):
                topo.relay.sysctl("net.core.rmem_max", str(self.rcvbuf))
            recv += f",rcvbuf={self.rcvbuf}"
            self.info["rmem_max"] = int(topo.relay.run("sysctl", "-n", "net.core.rmem_max"))
        send = f"UDP4-SENDTO:{OUT_GROUP}:{OUT_PORT},ip-multicast-if={RELAY_OUT_ADDR}"
        send += ",ip-multicast-ttl=8"
        argv = topo.relay.cmd(*self.taskset(), "socat", "-u", recv, send)
        self.info["argv"] = f"socat -u {recv} {send}"
        log = open(topo.tmp / "socat.log", "wb")  # noqa: SIM115 (closed below)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            port_hex = f":{IN_PORT:04X}"

            def ready() -> bool:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"socat exited: {(topo.tmp / 'socat.log').read_text()}")
                joined = IN_GROUP in topo.relay.run("ip", "maddr", "show", "dev", "rin0")
                return joined and port_hex in topo.relay.run("cat", "/proc/net/udp")

            wait_until(ready, 10, "socat to join and bind")
            ss = topo.relay.run("ss", "-uamn", f"sport = :{IN_PORT}")
            self.info["socket"] = " ".join(ss.split())
            rb = [w for w in ss.replace(",", " ").replace("(", " ").split() if w[:2] == "rb"]
            self.info["effective_rcvbuf"] = int(rb[0][2:]) if rb else None
            yield self
        finally:
            stop_process(self.proc)
            log.close()


def base_rule(outputs: int = 1) -> rules_mod.Rule:
    outs = [
        rules_mod.Output(group=f"239.2.2.{2 + i}", port=OUT_PORT, interface="rout0")
        for i in range(outputs)
    ]
    return rules_mod.make_rule(
        interface="rin0", group=IN_GROUP, port=IN_PORT, outputs=outs, rule_id="bench"
    )


class Mcrelay(System):
    def __init__(self, workers: int) -> None:
        super().__init__()
        self.workers = workers
        self.name = f"mcrelay-{workers}w"
        self.label = f"mcrelay, {workers} data worker{'s' if workers > 1 else ''}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket: Path | None = None
        self.worker_pids: list[int] = []
        self.outputs = 1

    def out_groups(self) -> list[str]:
        return [f"239.2.2.{2 + i}" for i in range(self.outputs)]

    def pids(self) -> list[int]:
        return ([self.proc.pid] if self.proc else []) + self.worker_pids

    def refresh_pids(self) -> list[dict[str, Any]]:
        assert self.socket is not None
        workers: list[dict[str, Any]] = ctl(self.socket, m.ListWorkers())
        self.worker_pids = [w["pid"] for w in workers if w.get("pid")]
        return workers

    def stats(self) -> dict[str, Any]:
        assert self.socket is not None
        result: dict[str, Any] = ctl(self.socket, m.GetStats())
        return result

    def counters(self) -> dict[str, int]:
        s = self.stats()
        out = {
            "ring_drops": int(s.get("kernel_drops", 0)),
            "worker_drops": sum(s.get("drops", {}).values()),
            "packets_in": sum(r["packets_in"] for r in s["rules"]),
            "out_packets": sum(o["packets"] for r in s["rules"] for o in r["outputs"]),
            "out_errors": sum(o["errors"] for r in s["rules"] for o in r["outputs"]),
        }
        return out

    def set_rules(self, rules: list[rules_mod.Rule]) -> float:
        """Replace the rule table; returns how long the daemon took (s)."""
        assert self.socket is not None
        t = time.perf_counter()
        ctl(self.socket, m.ReplaceRules(rules=tuple(rules)), timeout=60)
        took = time.perf_counter() - t
        self.outputs = max((len(r.outputs) for r in rules if r.id == "bench"), default=1)
        return took

    @contextlib.contextmanager
    def start(self, topo: Topo) -> Iterator[System]:
        self.topo = topo
        self.socket = topo.tmp / "mcrelay" / "control.sock"
        log = open(topo.tmp / "mcrelay.log", "wb")  # noqa: SIM115 (closed below)
        argv = topo.relay.cmd(
            *self.taskset(), PY, "-m", "mcrelay", "supervisor",
            "--control-socket", str(self.socket), "--num-workers", str(self.workers),
            "--log-level", "warning",
        )  # fmt: skip
        if "--state-dir" in _supervisor_help():  # never the system's saved rule table
            argv += ["--state-dir", str(topo.tmp / "mcrelay-state")]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        seen: set[int] = set()
        try:

            def up() -> bool:
                assert self.proc is not None and self.socket is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mcrelay exited: {(topo.tmp / 'mcrelay.log').read_text()}")
                try:
                    ctl(self.socket, m.Ping(), timeout=2)
                except Exception:
                    return False
                return True

            wait_until(up, 20, "mcrelay supervisor to answer", 0.1)
            self.set_rules([base_rule()])

            def running() -> bool:
                ws = self.refresh_pids()
                seen.update(self.worker_pids)
                return all(w["state"] == "running" for w in ws)

            wait_until(running, 20, "mcrelay workers to run", 0.1)
            self.info = {"workers": self.refresh_pids()}
            seen.update(self.worker_pids)
            yield self
        finally:
            stop_process(self.proc)
            seen.update(self.worker_pids)
            for pid in seen:  # only workers of this supervisor, by PID
                if pid_alive(pid) and comm(pid).startswith("mcrelay: "):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            log.close()


class Holder(System):
    """No relay: the relay namespace only does part of a relay's input work (see
    `tests.lab.bench.traffic hold`), to measure what that part costs on the relay core."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.name = f"input-{mode}"
        self.label = {
            "none": "input path only (nothing listens)",
            "join": "+ group membership (mcrelay's IGMP socket)",
            "ring": "+ membership + AF_PACKET ring",
        }[mode]
        self.proc: subprocess.Popen[bytes] | None = None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    @contextlib.contextmanager
    def start(self, topo: Topo) -> Iterator[System]:
        self.topo = topo
        argv = topo.relay.cmd(
            PY, *TRAFFIC, "hold",
            "--ifname", "rin0", "--group", IN_GROUP, "--mode", self.mode,
            "--cpu", cpu_list(topo.placement.relay_cpus),
        )  # fmt: skip
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        try:
            assert self.proc.stdout is not None
            if b"ready" not in self.proc.stdout.readline():
                raise RuntimeError(f"hold --mode {self.mode} did not start")
            yield self
        finally:
            if self.proc.stdin:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


_HELP: list[str] = []


def _supervisor_help() -> str:
    if not _HELP:
        argv = [PY, "-m", "mcrelay", "supervisor", "--help"]
        _HELP.append(subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout)
    return _HELP[0]


def make_system(name: str) -> System:
    table: dict[str, Callable[[], System]] = {
        "gen-ceiling": Ceiling,
        "kernel": Kernel,
        "socat": lambda: Socat(None),
        "socat-8m": lambda: Socat(SOCAT_BIG_RCVBUF),
        "mcrelay-1w": lambda: Mcrelay(1),
        "mcrelay-2w": lambda: Mcrelay(2),
    }
    return table[name]()


SYSTEMS = ("gen-ceiling", "kernel", "socat", "socat-8m", "mcrelay-1w", "mcrelay-2w")
