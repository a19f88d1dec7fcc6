"""Chaos soak of a real relay (see scripts/soak and docs/soak.md).

gen-ns → relay-ns → sink-ns (tests/netns/topology.py), a real supervisor with 2 data workers and
its own --state-dir in a temporary directory. The run is a sequence of *segments*: sinks join,
one generator per stream starts, and after a random (seeded) interval exactly one event is
induced — a worker SIGKILLed, or SIGSTOPped and SIGCONTed before or after the heartbeat timeout,
the supervisor SIGKILLed (and started again on the same state directory) or SIGSTOPped and
SIGCONTed, the input or output link set down and up, rules added and removed, a config load of a
few hundred rules and back, or nothing (a baseline) — then the soak waits for full recovery, lets
traffic run a little longer, stops the generators and collects the sinks. So every lost packet
belongs to exactly one event. At checkpoints (no traffic, the base rules only) it reads the
descriptors and RSS of every mcrelay process. At the end: no rule lost (`mcrelay rules --json`
equals the soak's bookkeeping), no orphan process or socket file, no wedge (a control request
unanswered within its deadline, or a worker not running again within heartbeat timeout + the
restart backoff's bound), descriptors and RSS flat from the early checkpoint to the end, and the
supervisor stops cleanly. Any of these failing makes the exit status 1.

Safety: traffic only inside the namespaces built here, to 239.0.0.0/8; processes are signalled
through pidfds after checking their identity (pid + start time), only ever ones this run started
(the supervisor's own Popen, workers it listed); every wait has a deadline; everything is ended
(a stopped supervisor is continued first) and the namespaces deleted on any exit, Ctrl-C and
SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import msgspec
import prctl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mcrelay import client
from mcrelay import config as config_mod
from mcrelay import rules as rules_mod
from mcrelay.errors import McrelayError
from mcrelay.ipc import messages as m
from mcrelay.supervisor.settings import SupervisorSettings
from tests.netns import topology
from tests.netns.relay import gen, mcrelay

STREAMS = 3
SIZE = 512
IN_PORT, OUT_PORT = 5000, 5001
SUPERVISOR_ARGS = ("--num-workers", "2", "--max-failures", "1000")
SETTINGS_NOTE = (
    "supervisor: --num-workers 2 --max-failures 1000 (so the induced failures never make a "
    "worker fatal);\nevery other setting default (heartbeat 3 s, backoff 0.25→16 s, "
    "stable-after 30 s)"
)
DEFAULTS = SupervisorSettings()  # the soak's supervisor runs with these (but the two above)
HEARTBEAT_TIMEOUT_S = DEFAULTS.heartbeat_timeout
# A worker not running again within heartbeat timeout + the restart backoff's bound (its cap and
# the start timeout, with slack for a loaded 2-CPU machine) is wedged: 3 + 16 + 10 + 5 = 34 s.
WEDGE_SLACK_S = 5.0
WORKER_WEDGE_S = (
    HEARTBEAT_TIMEOUT_S + DEFAULTS.backoff.maximum + DEFAULTS.startup_timeout + WEDGE_SLACK_S
)
RECOVERY_TIMEOUT = 45.0  # the soak stops waiting (and the run ends) after this
# A control request that gets no answer within this is wedged (a config load of a few hundred
# rules gets longer); the soak never asks while it holds the supervisor stopped.
REQUEST_DEADLINE_S = 10.0
LOAD_DEADLINE_S = 30.0
PAUSE_S = (0.2, HEARTBEAT_TIMEOUT_S - 1.0)  # pause-worker: SIGCONT before it counts as hung
HANG_S = (HEARTBEAT_TIMEOUT_S + 1.0, HEARTBEAT_TIMEOUT_S + 3.0)  # stop-worker: past the timeout
SUPERVISOR_STOP_S = (0.5, HEARTBEAT_TIMEOUT_S + 2.0)  # stop-supervisor: both sides of it
FLAP_S = (0.2, 2.0)  # link-flap: down for this long
BULK_RULES = (200, 400)  # config-load: rules in the file besides the soak's own
SEGMENT_MAX_S = 120  # a generator's --count covers this long; sinks stop 30 s later at the latest
EXTRA_RULES_MAX = 12
PRE_S = (0.5, 2.0)  # chaos interval: traffic flowing → event
TAIL_S = (0.5, 1.5)  # chaos interval: recovered → generators stopped
WARMUP_S = 5.0  # supervisor samples ignored after each start
SAMPLE_EVERY_S = 0.5
# Growth: descriptors and RSS of the supervisor, its spawner and every worker slot at checkpoints
# (no traffic, the base rules only, everything running), early = after every kind of event has
# happened once, end = after the last. Flat means: descriptors not more than early, RSS at most
# RSS_GROWTH_KIB more (allocator high-water marks after a large config load, not a leak).
RSS_GROWTH_KIB = 4096
CHECKPOINT_EVERY_S = 120.0  # and, for the report, one every this often in between
# Drop counters on the soak's own path (veths, sinks, the relay's rings and sends); the host-wide
# backlog counter is reported but explains nothing by itself. Veth counters count packets, and
# the relay sends with UDP GSO, so one dropped packet can carry several datagrams.
PATH_DROPS = (
    "gen_tx",
    "relay_in_rx",
    "relay_out_tx",
    "sink_rx",
    "sink_socket",
    "relay_ring",
    "relay_send_errors",
)
QUIET_KINDS = ("none", "churn", "kill-control", "config-load")  # must not lose a datagram
KINDS = (
    "none",
    "kill-data",
    "kill-control",
    "pause-worker",
    "stop-worker",
    "kill-supervisor",
    "stop-supervisor",
    "link-flap",
    "churn",
    "config-load",
)
WEIGHTS = {
    "none": 1,
    "kill-data": 3,
    "kill-control": 1,
    "pause-worker": 2,
    "stop-worker": 2,
    "stop-supervisor": 1,
    "link-flap": 2,
    "churn": 3,
    "config-load": 1,
}
ESTIMATE_S = {  # event + recovery, for deciding whether a segment still fits the budget
    "none": 0.0,
    "kill-data": 1.5,
    "kill-control": 1.5,
    "pause-worker": 3.0,
    "stop-worker": 6.0,
    "kill-supervisor": 4.0,
    "stop-supervisor": 6.0,
    "link-flap": 3.0,
    "churn": 2.0,
    "config-load": 6.0,
}
SEGMENT_OVERHEAD_S = 2.0  # sinks ready, generators up, drain and reports


class Interrupted(Exception):
    """SIGTERM: unwind like Ctrl-C so every finally block cleans up."""


# --- processes ------------------------------------------------------------------------------


Ident = tuple[int, int]  # (pid, start time in clock ticks): a process, never a recycled pid


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[19])


def ident_of(pid: int) -> Ident | None:
    st = proc_stat(pid)
    return None if st is None else (pid, st[2])


def state_of(ident: Ident) -> str | None:
    """The process's state letter (Z for a zombie), or None when that process is gone."""
    st = proc_stat(ident[0])
    return st[0] if st is not None and st[2] == ident[1] else None


def alive(ident: Ident) -> bool:
    return state_of(ident) not in (None, "Z")


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def is_worker_cmdline(cmd: bytes) -> bool:
    """Workers name themselves ``mcrelay: ID`` (the spawner that forks them ``mcrelay: spawner``,
    before that ``python -m mcrelay.worker.spawner``)."""
    return cmd.startswith(b"mcrelay:") or b"\0mcrelay.worker.spawner\0" in cmd


def is_spawner(cmd: bytes) -> bool:
    return cmd.startswith(b"mcrelay: spawner") or b"\0mcrelay.worker.spawner\0" in cmd


def is_spawner_of(cmd: bytes, ppid: int, supervisor: int | None) -> bool:
    """The supervisor's own spawner is no orphan while the supervisor lives."""
    return is_spawner(cmd) and ppid == supervisor


def spawners_of(supervisor: int) -> list[Ident]:
    """The supervisor's spawner(s): they die with it and are re-parented to us like workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_spawner(cmdline(int(entry.name))):
            st = proc_stat(int(entry.name))
            if st is not None and st[1] == supervisor:
                found.append((int(entry.name), st[2]))
    return found


def usage(ident: Ident) -> tuple[int, int] | None:
    """(open descriptors, VmRSS in KiB) of exactly this process, or None when it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{ident[0]}/fd"))
        status = Path(f"/proc/{ident[0]}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    if match is None or state_of(ident) in (None, "Z"):
        return None
    return fds, int(match[1])


def socket_files(root: Path, ns: topology.Netns | None = None) -> list[str]:
    """Unix socket files under ``root``, and with ``ns`` sockets there still bound to a path
    under it (/proc/net/unix is per network namespace, and shows the path of the bind even
    after the file was renamed)."""
    found = {str(p) for p in root.rglob("*") if p.is_socket()}
    for line in ns.run("cat", "/proc/net/unix").splitlines()[1:] if ns else ():
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith(str(root)):
            found.add(f"{fields[7]} (bound)")
    return sorted(found)


def send_signal(ident: Ident, sig: int) -> bool:
    """Signal exactly this process through a pidfd; False when it is already gone."""
    try:
        fd = os.pidfd_open(ident[0])
    except ProcessLookupError:
        return False
    try:
        if state_of(ident) is None:  # the pidfd refers to whatever has the pid now: check it
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def reap_if_ours(ident: Ident) -> None:
    """Workers orphaned by a killed supervisor are re-parented to us (child subreaper)."""
    st = proc_stat(ident[0])
    if st is not None and st[2] == ident[1] and st[1] == os.getpid() and st[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(ident[0], os.WNOHANG)


def reap_wait(ident: Ident, timeout: float) -> None:
    """Wait until a dead process is reaped, reaping it ourselves if it was re-parented to us."""

    def reaped() -> bool:
        reap_if_ours(ident)
        return state_of(ident) != "Z"

    poll(reaped, timeout)


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll until ``predicate`` returns something truthy; None at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def end_process(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL, grace: float = 5) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- the relay under test -------------------------------------------------------------------


class Relay:
    """The supervisor (our own Popen, restartable on the same state directory) and its workers."""

    def __init__(self, ns: topology.Netns, tmp: Path) -> None:
        self.ns = ns
        self.socket = tmp / "control.sock"
        self.state_dir = tmp / "state"
        self.log = tmp / "supervisor.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.instance = 0
        self.seen: set[Ident] = set()  # every worker process any of our supervisors listed
        self.current: dict[str, dict[str, Any]] = {}
        self.requests = 0  # control requests made (client library and CLI)
        self.wedges: list[str] = []  # control requests that got no answer within their deadline
        self.stopped = False  # the soak holds the supervisor SIGSTOPped

    def call(self, req: Any, deadline: float = REQUEST_DEADLINE_S) -> Any:
        """One control request; no answer within ``deadline`` is a wedge (and an error)."""
        self.requests += 1
        t = time.monotonic()
        try:
            return client.call(self.socket, req, timeout=deadline)
        except McrelayError:
            if time.monotonic() - t >= deadline - 0.05:
                self.wedges.append(f"{type(req).__name__}: no answer within {deadline:g} s")
            raise

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                self.ns.cmd(
                    sys.executable,
                    "-m",
                    "mcrelay",
                    "supervisor",
                    "--control-socket",
                    str(self.socket),
                    "--state-dir",
                    str(self.state_dir),
                    *SUPERVISOR_ARGS,
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.proc.pid  # `ip netns exec` execs: this is the supervisor itself
        self.instance += 1
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the supervisor exited ({proc.returncode}):\n{self.log_tail()}")
            try:
                self.call(m.Ping())
            except McrelayError:
                return False
            return True

        if not poll(answers, 15):
            raise RuntimeError(f"the supervisor did not answer within 15 s:\n{self.log_tail()}")

    def workers(self) -> dict[str, dict[str, Any]]:
        found = {w["id"]: w for w in self.call(m.ListWorkers())}
        for w in found.values():
            if w["pid"] and (ident := ident_of(w["pid"])) is not None:
                w["ident"] = ident
                self.seen.add(ident)
        return found

    def rules(self) -> list[dict[str, Any]]:
        return list(self.call(m.ListRules()))

    def cli(
        self, *args: str, deadline: float = REQUEST_DEADLINE_S
    ) -> subprocess.CompletedProcess[str]:
        """The CLI, as a user runs it; a request it reports unanswered, or a CLI that does not
        finish within ``deadline`` (+ its own start-up), is a wedge."""
        self.requests += 1
        argv = [sys.executable, "-m", "mcrelay", *args, "--socket", str(self.socket)]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=deadline + 20)
        except subprocess.TimeoutExpired:
            self.wedges.append(f"mcrelay {args[0]}: no answer within {deadline + 20:g} s")
            return subprocess.CompletedProcess(argv, 124, "", "timed out")
        if "did not answer within" in result.stderr:
            self.wedges.append(f"mcrelay {args[0]}: {result.stderr.strip()}")
        return result

    def kill(self) -> None:
        if self.proc is not None:
            end_process(self.proc, signal.SIGKILL)

    def pause(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
            self.stopped = True

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def stop(self) -> int | None:
        """SIGTERM; the exit status, or None if it had to be killed after 5 s."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.resume()  # a stopped supervisor would never act on SIGTERM
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class Sampler(threading.Thread):
    """The supervisor's descriptor count and RSS every SAMPLE_EVERY_S, tagged by instance."""

    def __init__(self, relay: Relay, t0: float) -> None:
        super().__init__(daemon=True)
        self.relay, self.t0 = relay, t0
        self.samples: list[tuple[float, int, int, int]] = []  # (t, instance, fds, rss KiB)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(SAMPLE_EVERY_S):
            pid, instance = self.relay.pid, self.relay.instance
            try:
                if b"supervisor" not in cmdline(pid):
                    continue
                fds = len(os.listdir(f"/proc/{pid}/fd"))
                status = Path(f"/proc/{pid}/status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            if match and fds:
                self.samples.append((time.monotonic() - self.t0, instance, fds, int(match[1])))


# --- traffic --------------------------------------------------------------------------------


@dataclasses.dataclass
class Event:
    kind: str
    at_s: float = 0.0  # since the chaos phase started
    victim: str = ""
    pre_s: float = 0.0
    recovery_s: float | None = None  # event → everything running with every rule again
    detected_s: float | None = None  # stop-worker: SIGSTOP → slot no longer running
    hold_s: float | None = None  # SIGSTOP → SIGCONT, or link down → up
    replaced: list[str] = dataclasses.field(default_factory=list)  # slots on a new process
    churn: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sent: int = 0
    lost: int = 0
    lost_by_stream: list[int] = dataclasses.field(default_factory=list)
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    # Where datagrams were dropped, to tell the relay's losses from the test bed's: the relay's
    # rings (kernel_drops) and refused sends (output errors), from `mcrelay stats`; veth and
    # per-CPU backlog drops (netdev_max_backlog; host-wide, so other work can add to them); the
    # sinks' own receive buffers.
    drops: dict[str, int] = dataclasses.field(default_factory=dict)
    log_tracebacks: int = 0  # "Traceback" lines the supervisor's and workers' stderr gained
    problems: list[str] = dataclasses.field(default_factory=list)


def net_drops(c: topology.Chain) -> dict[str, int]:
    """Drop counters along the path (veth pairs) and the host's per-CPU backlog drops."""
    with open("/proc/net/softnet_stat") as f:
        backlog = sum(int(line.split()[1], 16) for line in f)
    return {
        "gen_tx": counter(c.gen, c.gen_if, "tx_dropped"),
        "relay_in_rx": counter(c.relay, c.relay_in, "rx_dropped"),
        "relay_out_tx": counter(c.relay, c.relay_out, "tx_dropped"),
        "sink_rx": counter(c.sink, c.sink_if, "rx_dropped"),
        "backlog_host": backlog,
    }


def sink_group(i: int) -> str:
    return f"239.2.2.{i + 1}"


#: The fields of a listed rule the soak books; the daemon may list more (fields are added to
#: `rules --json`, never renamed), which the comparison leaves out.
BOOKED_INPUT = ("interface", "group", "port", "source")
BOOKED_OUTPUT = ("group", "port", "interface", "ttl")


def _as_booked(rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "input": {k: rule["input"].get(k) for k in BOOKED_INPUT},
        "outputs": [{k: o.get(k) for k in BOOKED_OUTPUT} for o in rule["outputs"]],
    }


def bulk_rule(i: int, c: topology.Chain) -> dict[str, Any]:
    """Rule ``i`` of a config load: its own group on the input, one output; no traffic."""
    return {
        "input": {
            "interface": c.relay_in,
            "group": f"239.5.{i // 200}.{i % 200 + 1}",
            "port": 7000,
            "source": None,
        },
        "outputs": [
            {
                "group": f"239.6.{i // 200}.{i % 200 + 1}",
                "port": 7001,
                "interface": c.relay_out,
                "ttl": 16,
            }
        ],
    }


def counter(ns: topology.Netns, interface: str, name: str) -> int:
    return int(ns.run("cat", f"/sys/class/net/{interface}/statistics/{name}").strip())


@contextlib.contextmanager
def sinks(c: topology.Chain) -> Iterator[list[subprocess.Popen[str]]]:
    """One sink per stream, all joined ("ready") before this yields; no idle stop (a supervisor
    restart is a silence); bounded by --duration and ended by SIGINT, which prints the report."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(STREAMS):
            procs.append(
                subprocess.Popen(
                    mcrelay(
                        c.sink,
                        "sink",
                        "--group",
                        sink_group(i),
                        "--port",
                        str(OUT_PORT),
                        "--interface",
                        c.sink_if,
                        "--json",
                        "--idle-timeout",
                        "0",
                        "--duration",
                        str(SEGMENT_MAX_S + 30),
                    ),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + 15
        for proc in procs:
            assert proc.stderr is not None
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("a sink did not become ready within 15 s")
                if select.select([proc.stderr], [], [], left)[0]:
                    line = proc.stderr.readline()
                    if not line:
                        raise RuntimeError("a sink exited before it was ready")
                    if line.startswith("ready"):
                        break
        yield procs
    finally:
        for proc in procs:
            end_process(proc)


def _where(pid: int) -> str:
    """What a stuck process is doing, for the report."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError as exc:
        return str(exc)
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    keep = ("State", "SigBlk", "SigIgn", "SigCgt", "Threads")
    return f"wchan {wchan}, " + ", ".join(f"{k} {fields.get(k, '?').strip()}" for k in keep)


def sink_report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    if proc.returncode != 0:
        raise RuntimeError(f"sink failed ({proc.returncode}): {err.strip()}")
    return dict(json.loads(out))


def stop_gen(proc: subprocess.Popen[str]) -> int:
    """SIGINT (exit 130, summary printed) or already done (0); returns datagrams sent."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"gen (pid {proc.pid}) ignored SIGINT for 15 s: {_where(proc.pid)}"
        ) from None
    match = re.search(r"sent (\d+)/", out)
    if proc.returncode not in (0, 130) or not match:
        raise RuntimeError(f"gen failed ({proc.returncode}): {err.strip() or out.strip()}")
    return int(match[1])


# --- the soak -------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    duration_s: float
    seed: int
    rate: float
    json: bool


class Soak:
    def __init__(self, opts: Options, chain: topology.Chain, relay: Relay) -> None:
        self.opts, self.c, self.relay = opts, chain, relay
        self.rng = random.Random(opts.seed)
        self.expected: dict[str, dict[str, Any]] = {}
        self.base_ids: list[str] = []
        self.next_extra = 0
        self.events: list[Event] = []
        self.problems: list[str] = []
        self.stopped: list[Ident] = []  # every process we SIGSTOPped, for the final check
        self.worker_wedges: list[str] = []  # events after which not all ran again in time
        self.rules_lost_seen = 0  # rules missing from a listing after an event
        self.loads = 0  # config loads made
        self.checkpoints: list[dict[str, Any]] = []  # fd/RSS per process, base table, no traffic
        self.rules_at_end = 0  # before the end checkpoint puts the base rules back
        self.t0 = time.monotonic()
        self.budget_end = 0.0
        self.supervisor_kills_allowed = 0
        # (supervisor instance, (kernel drops, output errors)) at the last reading
        self.relay_drops: tuple[int, tuple[int, int]] = (0, (0, 0))

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    # rules ------------------------------------------------------------------------------

    def add_rule(self, rid: str, group: str, port: int, outputs: list[tuple[str, int, int]]) -> str:
        args = [
            "add",
            "--input-interface",
            self.c.relay_in,
            "--input-group",
            group,
            "--input-port",
            str(port),
            "--id",
            rid,
        ]
        for addr, oport, ttl in outputs:
            args += ["--output", f"{addr}:{oport}:{self.c.relay_out}:{ttl}"]
        result = self.relay.cli(*args)
        if result.returncode != 0 or result.stdout.strip() != rid:
            return f"add {rid} failed ({result.returncode}): {result.stderr.strip()}"
        self.expected[rid] = {
            "input": {"interface": self.c.relay_in, "group": group, "port": port, "source": None},
            "outputs": [
                {"group": a, "port": p, "interface": self.c.relay_out, "ttl": t}
                for a, p, t in outputs
            ],
        }
        return ""

    def churn_once(self) -> dict[str, Any]:
        extras = sorted(set(self.expected) - set(self.base_ids))
        if not extras or (len(extras) < EXTRA_RULES_MAX and self.rng.random() < 0.55):
            n = self.next_extra
            self.next_extra += 1
            rid = f"soak-x{n}"
            outputs = [
                (f"239.4.{n // 200}.{n % 200 + 1}", 6001 + k, self.rng.choice((16, 32)))
                for k in range(self.rng.randint(1, 2))
            ]
            error = self.add_rule(rid, f"239.3.{n // 200}.{n % 200 + 1}", 6000, outputs)
            return {"op": "add", "id": rid, "error": error}
        rid = self.rng.choice(extras)
        result = self.relay.cli("remove", rid)
        error = "" if result.returncode == 0 else f"remove {rid}: {result.stderr.strip()}"
        if not error:
            del self.expected[rid]
        return {"op": "remove", "id": rid, "error": error}

    def rules_mismatch(self, listed: list[dict[str, Any]]) -> tuple[str, int]:
        """What differs from the bookkeeping, and how many of the soak's rules are missing."""
        got = {r["id"]: _as_booked(r) for r in listed}
        missing = sorted(set(self.expected) - set(got))
        unexpected = sorted(set(got) - set(self.expected))
        differ = sorted(k for k in set(got) & set(self.expected) if got[k] != self.expected[k])
        inactive = sorted(r["id"] for r in listed if r["state"] != "active")
        parts = [
            f"{name}: {', '.join(ids)}"
            for name, ids in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("different", differ),
                ("not active", inactive),
            )
            if ids
        ]
        return "; ".join(parts), len(missing) + len(differ)

    # health -----------------------------------------------------------------------------

    def healthy(self, replaced: dict[str, int]) -> dict[str, dict[str, Any]] | None:
        """Every worker running and alive, data workers holding every rule, and each slot in
        ``replaced`` on another process than the given pid."""
        try:
            ws = self.relay.workers()
        except McrelayError:  # the control worker is being replaced: ask again
            return None
        for w in ws.values():
            if w["state"] != "running" or "ident" not in w or not alive(w["ident"]):
                return None
            if w["kind"] == "data" and w["rules"] != len(self.expected):
                return None
        if any(ws[wid]["pid"] == pid for wid, pid in replaced.items()):
            return None
        try:  # and every rule active (a link that came back up is captured again)
            if any(r["state"] != "active" for r in self.relay.rules()):
                return None
        except McrelayError:
            return None
        return ws

    def wait_healthy(self, ev: Event | None = None, replaced: dict[str, int] | None = None) -> bool:
        """Poll until healthy; a timeout is a problem of the event (or of the run)."""
        ws = poll(lambda: self.healthy(replaced or {}), RECOVERY_TIMEOUT, 0.1)
        if ws is None:
            problem = f"not recovered within {RECOVERY_TIMEOUT:.0f} s"
            (ev.problems if ev is not None else self.problems).append(problem)
            return False
        self.relay.current = ws
        return True

    def gone(self, ident: Ident, ev: Event, what: str, timeout: float = 5) -> None:
        """The process must be gone (reaped): a zombie or stopped leftover is a problem."""
        if poll(lambda: state_of(ident) is None, timeout) is None:
            state = state_of(ident)
            ev.problems.append(f"{what} (pid {ident[0]}) still present in state {state}")
            send_signal(ident, signal.SIGKILL)  # ours: never leave it behind

    # events -----------------------------------------------------------------------------

    def inject(self, ev: Event) -> None:
        ws = self.relay.current
        t = time.monotonic()
        before = {wid: w["pid"] for wid, w in ws.items()}
        if ev.kind in ("kill-data", "kill-control", "stop-worker", "pause-worker"):
            self.signal_worker(ev, ws, t)
        elif ev.kind == "kill-supervisor":
            idents = [w["ident"] for w in ws.values()] + spawners_of(self.relay.pid)
            ev.victim = f"supervisor (pid {self.relay.pid})"
            self.relay.kill()
            died = poll(lambda: not any(alive(i) for i in idents), 5)
            if not died:
                survivors = [i[0] for i in idents if alive(i)]
                ev.problems.append(f"workers {survivors} outlived the supervisor (PDEATHSIG)")
                for i in idents:
                    send_signal(i, signal.SIGKILL)
            for i in idents:
                reap_wait(i, 2)
            self.relay.start()  # as systemd would: the same --state-dir and socket
            if self.wait_healthy(ev):
                ev.recovery_s = round(time.monotonic() - t, 3)
                self.check_rules(ev, "restarted supervisor")
                control = str(self.relay.socket)
                left = [f for f in socket_files(self.relay.state_dir.parent) if f != control]
                if left:
                    ev.problems.append(f"socket files left by the killed supervisor: {left}")
        elif ev.kind == "stop-supervisor":
            ev.victim = f"supervisor (pid {self.relay.pid})"
            if (ident := ident_of(self.relay.pid)) is not None:
                self.stopped.append(ident)
            hold = self.rng.uniform(*SUPERVISOR_STOP_S)
            self.relay.pause()
            try:
                time.sleep(hold)  # chaos interval; the soak asks nothing meanwhile
            finally:
                self.relay.resume()
            ev.hold_s = round(time.monotonic() - t, 2)
            if self.wait_healthy(ev):
                ev.recovery_s = round(time.monotonic() - t, 3)
                self.check_rules(ev, "after SIGCONT")
        elif ev.kind == "link-flap":
            ev.victim = self.rng.choice((self.c.relay_in, self.c.relay_out))
            hold = self.rng.uniform(*FLAP_S)
            self.c.relay.ip("link", "set", "dev", ev.victim, "down")
            try:
                time.sleep(hold)  # chaos interval
            finally:
                self.c.relay.ip("link", "set", "dev", ev.victim, "up")
            ev.hold_s = round(time.monotonic() - t, 2)
            if self.wait_healthy(ev):
                ev.recovery_s = round(time.monotonic() - t, 3)
        elif ev.kind == "churn":
            ev.churn = [self.churn_once() for _ in range(self.rng.randint(1, 3))]
            if self.wait_healthy(ev):
                ev.recovery_s = round(time.monotonic() - t, 3)
        elif ev.kind == "config-load":
            # the soak's rules plus a few hundred more, then back: two loads under traffic
            kept = dict(self.expected)
            n = self.rng.randint(*BULK_RULES)
            ev.victim = f"+{n} rules and back"
            bulk = {f"soak-bulk-{i}": bulk_rule(i, self.c) for i in range(n)}
            for table, when in (({**kept, **bulk}, "after the large load"), (kept, "after it")):
                error = self.load(table)
                if error:
                    ev.problems.append(error)
                    break
                if not self.wait_healthy(ev):
                    break
                self.check_rules(ev, when)
            else:
                ev.recovery_s = round(time.monotonic() - t, 3)
        ev.problems += [op["error"] for op in ev.churn if op["error"]]
        now = self.relay.current
        ev.replaced = sorted(w for w, pid in before.items() if now.get(w, {}).get("pid") != pid)
        if ev.kind != "none" and (ev.recovery_s is None or ev.recovery_s > WORKER_WEDGE_S):
            took = "never" if ev.recovery_s is None else f"after {ev.recovery_s:.1f} s"
            self.worker_wedges.append(
                f"{ev.kind} at {ev.at_s:.1f}s: running again {took} (bound {WORKER_WEDGE_S:g} s)"
            )

    def signal_worker(self, ev: Event, ws: dict[str, dict[str, Any]], t: float) -> None:
        """SIGKILL a worker, or SIGSTOP it and SIGCONT it after a while: before the heartbeat
        timeout (pause-worker: it must carry on) or after it (stop-worker: it must have been
        declared hung and replaced by then)."""
        if ev.kind == "kill-data":
            ev.victim = self.rng.choice(sorted(k for k, w in ws.items() if w["kind"] == "data"))
        elif ev.kind == "kill-control":
            ev.victim = "control"
        else:
            ev.victim = self.rng.choice(sorted(ws))
        victim = ws[ev.victim]
        ident: Ident = victim["ident"]
        stop = ev.kind in ("stop-worker", "pause-worker")
        hold = self.rng.uniform(*(HANG_S if ev.kind == "stop-worker" else PAUSE_S))
        if not send_signal(ident, signal.SIGSTOP if stop else signal.SIGKILL):
            ev.problems.append(f"{ev.victim} (pid {victim['pid']}) vanished before the signal")
        if stop:
            self.stopped.append(ident)
        if ev.kind != "pause-worker" and victim["kind"] == "data" and self.rng.random() < 0.4:
            ev.churn.append(self.churn_once())  # while the worker is dead or hung
        if ev.kind == "stop-worker":
            old = victim["pid"]
            left = poll(
                lambda: self.slot_left(ev.victim, old), RECOVERY_TIMEOUT, 0.1
            )  # the heartbeat timeout must catch it
            if left:
                ev.detected_s = round(time.monotonic() - t, 3)
        if stop:
            time.sleep(max(0.0, t + hold - time.monotonic()))
            send_signal(ident, signal.SIGCONT)  # normally gone by now after a hang
            ev.hold_s = round(time.monotonic() - t, 2)
        replaced = {} if ev.kind == "pause-worker" else {ev.victim: victim["pid"]}
        if self.wait_healthy(ev, replaced):
            ev.recovery_s = round(time.monotonic() - t, 3)
        if ev.kind != "pause-worker":
            what = "hung worker" if stop else "killed worker"
            self.gone(ident, ev, what)

    def check_rules(self, ev: Event, when: str) -> None:
        """The supervisor lists exactly the soak's rules; a missing one is a rule lost."""
        mismatch, missing = self.rules_mismatch(self.relay.rules())
        if mismatch:
            ev.problems.append(f"rules {when} differ: {mismatch}")
            self.rules_lost_seen += missing

    def load(self, table: dict[str, dict[str, Any]]) -> str:
        """`mcrelay config load` of a file holding exactly ``table``; the bookkeeping follows."""
        rules = msgspec.convert(
            [{"id": rid, **spec} for rid, spec in sorted(table.items())],
            tuple[rules_mod.Rule, ...],
        )
        path = self.relay.state_dir.parent / "load.toml"
        path.write_text(config_mod.dump(rules), encoding="utf-8")
        result = self.relay.cli("config", "load", str(path), deadline=LOAD_DEADLINE_S)
        if result.returncode != 0:
            return f"config load of {len(table)} rules failed: {result.stderr.strip()}"
        self.expected = dict(table)
        self.loads += 1
        return ""

    def checkpoint(self, label: str) -> None:
        """Descriptors and RSS of the supervisor, its spawner and every worker in one fixed
        state: no traffic, the base rules only (a config load puts the table back), everything
        running; the median of 5 readings 0.2 s apart, 1 s after the relay settled."""
        error = self.load({rid: self.expected[rid] for rid in self.base_ids})
        if error or not self.wait_healthy():
            self.problems.append(f"checkpoint {label}: {error or 'the relay did not settle'}")
            return
        time.sleep(1.0)  # the last acknowledgements and membership changes settle
        procs: dict[str, Ident | None] = {"supervisor": ident_of(self.relay.pid)}
        for found in spawners_of(self.relay.pid):
            procs["spawner"] = found
        for wid, w in sorted(self.relay.current.items()):
            procs[wid] = w["ident"]
        readings: dict[str, list[tuple[int, int]]] = {name: [] for name in procs}
        for _ in range(5):
            for name, ident in procs.items():
                if ident is not None and (u := usage(ident)) is not None:
                    readings[name].append(u)
            time.sleep(0.2)
        point: dict[str, Any] = {
            "label": label,
            "at_s": round(time.monotonic() - self.t0, 1),
            "rules": len(self.expected),
            "processes": {
                name: {
                    "pid": procs[name][0],  # type: ignore[index]
                    "fds": int(statistics.median(r[0] for r in rs)),
                    "rss_kib": int(statistics.median(r[1] for r in rs)),
                }
                for name, rs in readings.items()
                if rs
            },
        }
        self.checkpoints.append(point)
        self.log(
            f"checkpoint {label}: "
            + ", ".join(
                f"{n} {p['fds']} fds {p['rss_kib']} KiB" for n, p in point["processes"].items()
            )
        )

    def slot_left(self, wid: str, old_pid: int) -> bool:
        try:
            w = self.relay.workers()[wid]
        except McrelayError:
            return False
        return bool(w["state"] != "running" or w["pid"] != old_pid)

    def account_relay_drops(self) -> None:
        """Kernel drops of the relay since the previous call, credited to the previous event.
        Asked once every rate reads 0 (each worker has reported since the traffic stopped);
        a restarted supervisor counts from zero."""

        def settled() -> dict[str, Any] | None:
            try:
                st: dict[str, Any] = self.relay.call(m.GetStats())
            except McrelayError:
                return None
            return st if all(r["pps_in"] == 0.0 for r in st["rules"]) else None

        stats = poll(settled, 5, 0.2)
        if stats is None:
            return
        ring = int(stats["kernel_drops"])
        errors = sum(o["errors"] for r in stats["rules"] for o in r["outputs"])
        instance, before = self.relay_drops
        if self.events and "relay_ring" not in self.events[-1].drops:
            same = instance == self.relay.instance
            self.events[-1].drops["relay_ring"] = ring - before[0] if same else ring
            self.events[-1].drops["relay_send_errors"] = errors - before[1] if same else errors
        self.relay_drops = (self.relay.instance, (ring, errors))

    def segment(self, ev: Event) -> None:
        c, rate = self.c, self.opts.rate
        log_at = self.relay.log.stat().st_size
        net_before = net_drops(c)
        with sinks(c) as sink_procs:
            gens: list[subprocess.Popen[str]] = []
            try:
                base = counter(c.sink, c.sink_if, "rx_packets")
                for i in range(STREAMS):
                    gens.append(
                        gen(
                            c.gen,
                            f"239.1.1.{i + 1}",
                            IN_PORT,
                            "--rate",
                            str(rate),
                            "--count",
                            str(int(rate * SEGMENT_MAX_S)),
                            "--size",
                            str(SIZE),
                            "--stream",
                            str(i),
                        )
                    )
                # traffic flows through the relay before anything happens
                flowing = STREAMS * max(10, int(rate * 0.05))
                if not poll(lambda: counter(c.sink, c.sink_if, "rx_packets") - base >= flowing, 15):
                    raise RuntimeError("no traffic reached the sink within 15 s")
                time.sleep(ev.pre_s)  # chaos interval
                ev.at_s = round(time.monotonic() - self.t0, 1)
                self.inject(ev)
                time.sleep(self.rng.uniform(*TAIL_S))  # chaos interval
                sent = [stop_gen(g) for g in gens]
            finally:
                for g in gens:
                    end_process(g)
            self.wait_drained()
            reports = [sink_report(p) for p in sink_procs]
        ev.drops.update({k: v - net_before[k] for k, v in net_drops(c).items()})
        for i, (n, rep) in enumerate(zip(sent, reports, strict=True)):
            st = rep["streams"].get(str(i), {"unique": 0, "max_seq": -1})
            expected = max(n, st["max_seq"] + 1)  # seqs start at 0; SIGINT may undercount sent
            ev.sent += expected
            ev.lost_by_stream.append(expected - st["unique"])
            ev.duplicated += rep["duplicated"]
            ev.reordered += rep["reordered"]
            ev.corrupted += rep["corrupted"]
            ev.drops["sink_socket"] = ev.drops.get("sink_socket", 0) + (rep["socket_drops"] or 0)
            if set(rep["streams"]) - {str(i)}:
                ev.problems.append(f"sink {i} saw foreign streams {sorted(rep['streams'])}")
        ev.lost = sum(ev.lost_by_stream)
        with open(self.relay.log, "rb") as log:
            log.seek(log_at)
            ev.log_tracebacks = log.read().count(b"Traceback")

    def wait_drained(self) -> None:
        """Generators have stopped: wait until the sink's interface counter stands still."""
        last = [-1]

        def still() -> bool:
            now = counter(self.c.sink, self.c.sink_if, "rx_packets")
            same, last[0] = now == last[0], now
            return same

        poll(still, 5, 0.15)

    def pick(self, schedule: list[str]) -> tuple[str, float] | None:
        """The next kind and its pre-event interval, or None when no segment fits the budget."""
        left = self.budget_end - time.monotonic()
        pre = self.rng.uniform(*PRE_S)
        if schedule:
            kind = schedule.pop(0)
        else:
            weights = dict(WEIGHTS)
            if self.supervisor_kills_allowed > 0 and left > (self.budget_end - self.t0) / 2:
                weights["kill-supervisor"] = 1
            kinds = sorted(weights)
            kind = self.rng.choices(kinds, [weights[k] for k in kinds])[0]
        need = SEGMENT_OVERHEAD_S + pre + ESTIMATE_S[kind] + TAIL_S[1]
        if need > left:
            kind = "none"
            pre = min(pre, left - SEGMENT_OVERHEAD_S - TAIL_S[1])
            if pre < PRE_S[0]:
                return None
        if kind == "kill-supervisor":
            self.supervisor_kills_allowed -= 1
        return kind, pre

    def run(self) -> None:
        relay = self.relay
        self.log(SETTINGS_NOTE)
        relay.start()
        for i in range(STREAMS):
            rid = f"soak-base-{i}"
            self.base_ids.append(rid)
            error = self.add_rule(rid, f"239.1.1.{i + 1}", IN_PORT, [(sink_group(i), OUT_PORT, 16)])
            if error:
                raise RuntimeError(error)
        if not self.wait_healthy():
            raise RuntimeError("the relay did not come up:\n" + relay.log_tail())
        self.t0 = time.monotonic()
        self.budget_end = self.t0 + self.opts.duration_s
        self.supervisor_kills_allowed = max(1, int(self.opts.duration_s / 180))
        # every kind once (the supervisor first, so the last instance lives long enough for the
        # fd/RSS trend; then the data-path failures, longest first, so a short run on a slow
        # machine still has them), then weighted random choices; a kind that no longer fits the
        # budget becomes a baseline ("none")
        rest = ["kill-data", "kill-control", "churn"]
        self.rng.shuffle(rest)
        schedule = [
            "kill-supervisor",
            "stop-worker",
            "config-load",
            "link-flap",
            "pause-worker",
            "stop-supervisor",
            *rest,
        ]
        # the early checkpoint once every kind has happened (or half the budget is gone: a
        # short run on a slow machine), then one every CHECKPOINT_EVERY_S, and one at the end
        half = self.t0 + self.opts.duration_s / 2
        next_checkpoint = 0.0
        for _ in range(10_000):  # bounded; the budget ends it long before
            now = time.monotonic()
            if (not schedule or now >= half) and now >= next_checkpoint:
                self.checkpoint("early" if not self.checkpoints else "interval")
                next_checkpoint = time.monotonic() + CHECKPOINT_EVERY_S
            picked = self.pick(schedule)
            if picked is None:
                break
            self.account_relay_drops()
            ev = Event(kind=picked[0], pre_s=round(picked[1], 2))
            self.events.append(ev)
            try:
                self.segment(ev)
            except (RuntimeError, McrelayError, OSError, subprocess.SubprocessError) as exc:
                ev.problems.append(f"segment aborted: {exc}")
            self.problems += [f"{ev.kind} at {ev.at_s:.1f}s: {p}" for p in ev.problems]
            churn = ", ".join(f"{op['op']} {op['id']}" for op in ev.churn)
            self.log(
                f"{ev.kind:15} {ev.victim:26} recovery {_fmt(ev.recovery_s):>6}s  "
                f"lost {ev.lost:6}/{ev.sent}"
                + (f" [drops: {_nonzero(ev.drops)}]" if any(ev.drops.values()) else "")
                + (f" DUPLICATED {ev.duplicated}" if ev.duplicated else "")
                + (f" CORRUPTED {ev.corrupted}" if ev.corrupted else "")
                + (f"  churn: {churn}" if churn else "")
                + (f"  PROBLEM: {'; '.join(ev.problems)}" if ev.problems else "")
            )
            if any(p.startswith(("not recovered", "segment aborted")) for p in ev.problems):
                break  # nothing after this would mean anything


def _nonzero(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items() if v)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- final checks and report ----------------------------------------------------------------


def trend(samples: list[tuple[float, int, int, int]]) -> dict[str, Any]:
    """Per supervisor instance: descriptors and RSS after warm-up → last, min and max (for the
    report; growth is judged on checkpoints, see judge_growth)."""
    instances: dict[int, list[tuple[float, int, int, int]]] = {}
    for s in samples:
        instances.setdefault(s[1], []).append(s)
    summary = []
    for inst, series in sorted(instances.items()):
        settled = [s for s in series if s[0] - series[0][0] >= WARMUP_S] or series
        summary.append(
            {
                "instance": inst,
                "samples": len(series),
                "span_s": round(series[-1][0] - series[0][0], 1),
                # after warm-up → last, then min and max after warm-up
                "fds": [
                    settled[0][2],
                    settled[-1][2],
                    min(s[2] for s in settled),
                    max(s[2] for s in settled),
                ],
                "rss_kib": [
                    settled[0][3],
                    settled[-1][3],
                    min(s[3] for s in settled),
                    max(s[3] for s in settled),
                ],
            }
        )
    return {"instances": summary}


def scan_processes(soak: Soak) -> dict[str, Any]:
    """Orphans (worker processes of ours that are not current workers), zombie children of the
    supervisor or of us, and stopped processes we left; polled briefly so a process caught
    between death and reaping is not counted."""
    relay = soak.relay
    current = {w["ident"] for w in relay.current.values()}
    netns = f"net:[{os.stat(f'/run/netns/{relay.ns.name}').st_ino}]"

    def scan() -> dict[str, Any]:
        orphans, zombies, foreign = [], [], 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            st, cmd = proc_stat(pid), cmdline(pid)
            if st is None:
                continue
            ident = (pid, st[2])
            if is_worker_cmdline(cmd) and st[0] != "Z" and not is_spawner_of(cmd, st[1], relay.pid):
                try:
                    ours = ident in relay.seen or os.readlink(f"/proc/{pid}/ns/net") == netns
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if ours and ident not in current:
                    name = cmd.split(b"\0")[0].decode(errors="replace")
                    orphans.append(f"{pid} {name}")
                elif not ours:
                    foreign += 1
            if st[0] == "Z" and st[1] in (relay.pid, os.getpid()):
                zombies.append(f"{pid} (child of {st[1]})")
        stopped = [f"{i[0]}" for i in soak.stopped if state_of(i) in ("T", "t")]
        return {
            "orphans": orphans,
            "zombies": zombies,
            "stopped": stopped,
            "foreign_workers": foreign,
        }

    found: dict[str, Any] = {}

    def clean() -> bool:
        found.update(scan())
        return not (found["orphans"] or found["zombies"] or found["stopped"])

    poll(clean, 2, 0.2)
    return found


def final_checks(soak: Soak, samples: list[tuple[float, int, int, int]]) -> dict[str, Any]:
    relay = soak.relay
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": ok, "detail": detail})

    soak.wait_healthy()
    soak.account_relay_drops()
    listed = relay.cli("rules", "--json")
    rules_lost: int | None = None
    if listed.returncode == 0:
        rules = json.loads(listed.stdout)
        mismatch, rules_lost = soak.rules_mismatch(rules)
        check("rules", not mismatch, mismatch or f"{len(rules)} rules, as expected, all active")
    else:
        check("rules", False, f"`mcrelay rules --json` failed: {listed.stderr.strip()}")
    listed = relay.cli("workers", "--json")
    if listed.returncode == 0:
        ws = json.loads(listed.stdout)
        bad = [f"{w['id']} {w['state']}" for w in ws if w["state"] != "running"]
        bad += [
            f"{w['id']} holds {w['rules']} rules"
            for w in ws
            if w["kind"] == "data" and w["rules"] != len(soak.expected)
        ]
        restarts = ", ".join(f"{w['id']} {w['restarts']}" for w in ws)
        check("workers", not bad, "; ".join(bad) or f"all running (restarts: {restarts})")
    else:
        check("workers", False, f"`mcrelay workers --json` failed: {listed.stderr.strip()}")
    procs = scan_processes(soak)
    for key in ("orphans", "zombies", "stopped"):
        check(key, not procs[key], ", ".join(procs[key]) or "none")
    tr = trend(samples)  # information: the supervisor's fd/RSS over each of its lives
    soak.rules_at_end = len(soak.expected)
    soak.checkpoint("end")
    growth = judge_growth(soak.checkpoints)
    check("growth", growth["ok"], growth["detail"])
    corrupted = sum(e.corrupted for e in soak.events)
    duplicated = sum(e.duplicated for e in soak.events)
    check(
        "integrity",
        corrupted == 0 and duplicated == 0,
        f"{corrupted} corrupted, {duplicated} duplicated datagrams",
    )
    # Segments without a data-path failure must not lose a datagram, unless a drop counter on
    # the path says where it went (a busy host overflows the veths' backlog): only loss nothing
    # accounts for fails the run.
    quiet = [e for e in soak.events if e.kind in QUIET_KINDS]
    lossy = [e for e in quiet if e.lost]
    unexplained = [e for e in lossy if not any(e.drops.get(k) for k in PATH_DROPS)]
    detail = (
        f"{sum(e.lost for e in quiet)} of {sum(e.sent for e in quiet)} datagrams lost in "
        f"{len(quiet)} segments without a data-path failure ({', '.join(QUIET_KINDS)})"
    )
    if lossy:
        detail += (
            f"; {sum(e.lost for e in unexplained)} unaccounted for, the rest in segments where "
            "path drop counters moved: "
            + ", ".join(
                f"{e.kind}@{e.at_s}s lost {e.lost} ({_nonzero(e.drops)})"
                for e in lossy
                if e not in unexplained
            )
        )
    check("no-fault loss", not unexplained, detail)
    check("events", not soak.problems, "; ".join(soak.problems) or "every event recovered")
    wedges = relay.wedges + soak.worker_wedges
    check(
        "wedges",
        not wedges,
        "; ".join(wedges)
        or f"{relay.requests} control requests answered within {REQUEST_DEADLINE_S:g} s "
        f"({LOAD_DEADLINE_S:g} s for a config load); every worker running again within "
        f"{WORKER_WEDGE_S:g} s of every event",
    )
    # the last supervisor stops cleanly and takes its workers with it
    idents = [w["ident"] for w in relay.current.values()]
    status = relay.stop()
    leftover = poll(lambda: not any(alive(i) for i in idents), 3) is None
    check(
        "clean stop",
        status == 0 and not leftover,
        f"SIGTERM → exit {status}" + (", workers left behind" if leftover else ", workers gone"),
    )
    sockets = socket_files(relay.state_dir.parent, relay.ns)
    check("socket files", not sockets, ", ".join(sockets) or "none left after the stop")
    log = relay.log.read_text(errors="replace") if relay.log.exists() else ""
    # A supervisor that crashed would have failed a check above; tracebacks of workers are
    # reported (with the events they followed) without failing the run.
    internal = log.count("internal error")
    tracebacks = {e.kind: 0 for e in soak.events if e.log_tracebacks}
    for e in soak.events:
        if e.log_tracebacks:
            tracebacks[e.kind] += 1
    detail = ", ".join(f"after {n} {kind} event(s)" for kind, n in tracebacks.items())
    check("log", internal == 0, f"{internal} internal errors")
    if tracebacks:
        check("log tracebacks", True, f"{log.count('Traceback')} 'Traceback' lines, {detail}")
        checks[-1]["warn"] = True
    invariants = {
        "rules_lost": rules_lost,
        "orphans": len(procs["orphans"]) + len(sockets),
        "wedges": len(wedges),
        "growth_flat": growth["ok"],
    }
    return {
        "checks": checks,
        "invariants": invariants,
        "trend": tr,
        "growth": growth,
        "checkpoints": soak.checkpoints,
        "processes": procs,
    }


def judge_growth(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Early checkpoint → end, per process slot: descriptors not more, RSS at most
    RSS_GROWTH_KIB more."""
    early = next((p for p in points if p["label"] == "early"), None)
    end = points[-1] if points and points[-1]["label"] == "end" else None
    if early is None or end is None:
        return {"ok": False, "detail": "no early or no end checkpoint", "slots": {}}
    slots: dict[str, Any] = {}
    bad = []
    for name, e in early["processes"].items():
        f = end["processes"].get(name)
        if f is None:
            bad.append(f"{name} missing at the end")
            continue
        dfd, drss = f["fds"] - e["fds"], f["rss_kib"] - e["rss_kib"]
        same = "same process" if f["pid"] == e["pid"] else "replaced"
        slots[name] = {"fds": [e["fds"], f["fds"]], "rss_kib": [e["rss_kib"], f["rss_kib"]]}
        slots[name]["process"] = same
        if dfd > 0 or drss > RSS_GROWTH_KIB:
            bad.append(f"{name} ({same}) fds {e['fds']}→{f['fds']}, RSS {drss:+d} KiB")
    span = end["at_s"] - early["at_s"]
    detail = "; ".join(bad) or (
        f"early ({early['at_s']:g} s) → end ({end['at_s']:g} s): fds "
        + ", ".join(f"{n} {s['fds'][0]}→{s['fds'][1]}" for n, s in slots.items())
        + "; RSS KiB "
        + ", ".join(f"{n} {s['rss_kib'][1] - s['rss_kib'][0]:+d}" for n, s in slots.items())
        + f" (flat: fds not more, RSS at most +{RSS_GROWTH_KIB} KiB, over {span:g} s)"
    )
    return {"ok": not bad, "detail": detail, "slots": slots, "rss_bound_kib": RSS_GROWTH_KIB}


def by_kind(events: list[Event]) -> dict[str, dict[str, Any]]:
    """Figures per event kind; a hang also per victim (a hung control worker loses nothing)."""
    groups: list[tuple[str, list[Event]]] = []
    for kind in KINDS:
        groups.append((kind, [e for e in events if e.kind == kind]))
        if kind == "stop-worker":
            for victim in ("data", "control"):
                evs = [e for e in events if e.kind == kind and e.victim.startswith(victim)]
                groups.append((f"{kind}:{victim}", evs))
    out: dict[str, dict[str, Any]] = {}
    for kind, evs in groups:
        if not evs:
            continue
        rec = [e.recovery_s for e in evs if e.recovery_s is not None]
        det = [e.detected_s for e in evs if e.detected_s is not None]
        out[kind] = {
            "events": len(evs),
            "sent": sum(e.sent for e in evs),
            "lost": sum(e.lost for e in evs),
            "lost_per_event_mean": round(statistics.mean(e.lost for e in evs), 1),
            "lost_per_event_max": max(e.lost for e in evs),
            "lost_per_event_median": statistics.median(e.lost for e in evs),
            "drops": {
                k: sum(e.drops.get(k, 0) for e in evs)
                for k in sorted({k for e in evs for k in e.drops})
            },
            "recovery_s_median": round(statistics.median(rec), 3) if rec else None,
            "recovery_s_max": max(rec) if rec else None,
            "detected_s_median": round(statistics.median(det), 3) if det else None,
        }
    return out


def render(report: dict[str, Any]) -> str:
    lines = [
        f"mcrelay soak: {report['result'].upper()}  (seed {report['seed']}, "
        f"{report['duration_budget_s']:g} s budget, ran {report['duration_s']} s, "
        f"{report['rate']:g} pps × {STREAMS} streams, {SIZE} B)",
        report["settings"],
        "",
        f"{'event':20} {'n':>4} {'lost total':>11} {'lost/event':>11} {'max':>7} "
        f"{'recovery med/max s':>19}",
    ]
    for kind, s in report["by_kind"].items():
        rec = f"{_fmt(s['recovery_s_median'])}/{_fmt(s['recovery_s_max'])}"
        mean, top = s["lost_per_event_mean"], s["lost_per_event_max"]
        lines.append(f"{kind:20} {s['events']:>4} {s['lost']:>11} {mean:>11} {top:>7} {rec:>19}")
    dropped = [(kind, _nonzero(s["drops"])) for kind, s in report["by_kind"].items()]
    if any(text for _, text in dropped):
        lines += ["", "drop counters that moved (packets; a GSO packet carries several datagrams):"]
        lines += [f"  {kind:20} {text}" for kind, text in dropped if text]
    c = report["churn"]
    lines += [
        "",
        f"rules churned: {c['added']} added, {c['removed']} removed "
        f"({c['during_outage']} while a data worker was dead or hung); "
        f"{c['final_rules']} rules at the end",
        f"config loads: {report['config_loads']} (of up to {BULK_RULES[1]} + the soak's rules,"
        " and back; checkpoints included)",
        f"packets: {report['sent']} sent, {report['lost']} lost "
        f"({report['lost'] / max(1, report['sent']):.4%})",
        f"calm periods ({', '.join(QUIET_KINDS)}): {report['calm']['delivered']} of "
        f"{report['calm']['sent']} delivered, {report['calm']['lost']} lost",
        "invariants: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report["invariants"].items()),
        "fd / RSS (KiB) per process at each checkpoint (base rules, no traffic):",
    ]
    for point in report["checkpoints"]:
        lines.append(
            f"  {point['label']:8} {point['at_s']:7.1f} s  "
            + ", ".join(f"{n} {p['fds']}/{p['rss_kib']}" for n, p in point["processes"].items())
        )
    lines.append(
        f"supervisor fd / RSS (KiB) per instance, {WARMUP_S:g} s after start→last [min..max]:"
    )
    for inst in report["trend"]["instances"]:
        f, r = inst["fds"], inst["rss_kib"]
        lines.append(
            f"  #{inst['instance']} {inst['span_s']:7.1f} s  fds {f[0]}→{f[1]} "
            f"[{f[2]}..{f[3]}]  RSS {r[0]}→{r[1]} [{r[2]}..{r[3]}]"
        )
    lines.append("")
    for chk in report["checks"]:
        mark = "warn" if chk.get("warn") else "ok  " if chk["ok"] else "FAIL"
        lines.append(f"{mark} {chk['name']:15} {chk['detail']}")
    if report.get("log_tail"):
        lines += ["", "supervisor log (tail):", report["log_tail"]]
    return "\n".join(lines)


def run(opts: Options) -> tuple[int, dict[str, Any]]:
    prctl.set_child_subreaper(True)  # workers orphaned by a killed supervisor come to us
    started = time.monotonic()
    with topology.chain() as c, tempfile.TemporaryDirectory(prefix="mcrelay-soak-") as tmp:
        relay = Relay(c.relay, Path(tmp))
        soak = Soak(opts, c, relay)
        sampler = Sampler(relay, started)
        sampler.start()
        try:
            soak.run()
            result = final_checks(soak, sampler.samples)
        finally:
            sampler.halt.set()
            sampler.join(timeout=5)
            cleanup(relay)
        log_tail = relay.log_tail()
    events = soak.events
    churn_ops = [op for e in events for op in e.churn if not op["error"]]
    calm = [e for e in events if e.kind in QUIET_KINDS]
    ok = all(chk["ok"] for chk in result["checks"])
    report: dict[str, Any] = {
        "result": "pass" if ok else "fail",
        "seed": opts.seed,
        "minutes": round(opts.duration_s / 60, 2),
        "duration_budget_s": opts.duration_s,
        "rate": opts.rate,
        "duration_s": round(time.monotonic() - started, 1),
        "settings": SETTINGS_NOTE,
        "by_kind": by_kind(events),
        "churn": {
            "added": sum(op["op"] == "add" for op in churn_ops),
            "removed": sum(op["op"] == "remove" for op in churn_ops),
            "during_outage": sum(len(e.churn) for e in events if e.kind != "churn"),
            "final_rules": soak.rules_at_end,
        },
        "config_loads": soak.loads,
        "sent": sum(e.sent for e in events),
        "lost": sum(e.lost for e in events),
        "calm": {
            "segments": len(calm),
            "sent": sum(e.sent for e in calm),
            "delivered": sum(e.sent - e.lost for e in calm),
            "lost": sum(e.lost for e in calm),
        },
        **result,
        "events": [dataclasses.asdict(e) for e in events],
        "log_tail": "" if ok else log_tail,
    }
    return (0 if ok else 1), report


def cleanup(relay: Relay) -> None:
    """End the supervisor (SIGTERM, then SIGKILL) and any worker process of ours still alive,
    stopped ones included (SIGKILL ends a stopped process), then reap what was re-parented."""
    relay.stop()
    for ident in relay.seen:
        if alive(ident) and is_worker_cmdline(cmdline(ident[0])):
            send_signal(ident, signal.SIGKILL)
    for ident in relay.seen:
        reap_wait(ident, 1)


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise Interrupted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, metavar="SECONDS", help="chaos phase length")
    length.add_argument("--minutes", type=float, help="chaos phase length (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--rate", type=float, default=5000.0, help="pps per stream")
    parser.add_argument("--json", action="store_true", help="JSON report on stdout")
    args = parser.parse_args()
    if not topology.have_netns():
        print(
            "scripts/soak needs root and iproute2 (it builds network namespaces)", file=sys.stderr
        )
        return 2
    duration = args.duration if args.duration is not None else (args.minutes or 10.0) * 60
    if duration <= 0 or args.rate <= 0:
        parser.error("the duration and --rate must be positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C ends the soak, and its generators and sinks get SIGINT's default back even when
    # the soak was started with SIGINT ignored (a background job of a non-interactive shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, report = run(Options(duration, seed, args.rate, args.json))
    except (KeyboardInterrupt, Interrupted):
        print("soak: interrupted; processes ended and namespaces removed", file=sys.stderr)
        return 130
    text = render(report)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
