"""The final checks: rules, workers, orphans, growth, loss without a fault, wedges, a clean stop
and the log."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from tests.lab.processes import poll
from tests.lab.soak.events import Event
from tests.lab.soak.procs import (
    alive,
    cmdline,
    is_spawner_of,
    is_worker_cmdline,
    proc_stat,
    socket_files,
    state_of,
)
from tests.lab.soak.report import nonzero
from tests.lab.soak.settings import (
    LOAD_DEADLINE_S,
    PATH_DROPS,
    QUIET_KINDS,
    REQUEST_DEADLINE_S,
    RSS_GROWTH_KIB,
    TAKEOVER_DUPLICATES,
    WARMUP_S,
    WORKER_WEDGE_S,
)

if TYPE_CHECKING:
    from tests.lab.soak.core import Soak


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
    # A data worker's replacement relays again the block it had half sent: at most one block
    # per stream per takeover; duplicates anywhere else are a bug.
    too_many = [
        f"{e.kind} at {e.at_s:.1f}s: {e.duplicated}"
        for e in soak.events
        if e.duplicated > (TAKEOVER_DUPLICATES if takes_over(e) else 0)
    ]
    check(
        "integrity",
        corrupted == 0 and not too_many,
        f"{corrupted} corrupted, {duplicated} duplicated datagrams"
        + (f" (beyond one ring block per takeover: {', '.join(too_many)})" if too_many else ""),
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
                f"{e.kind}@{e.at_s}s lost {e.lost} ({nonzero(e.drops)})"
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


def takes_over(ev: Event) -> bool:
    """A data worker died or hung in this event: its replacement took over its rings."""
    return ev.kind in ("kill-data", "stop-worker") and ev.victim.startswith("data-")
