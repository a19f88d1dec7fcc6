"""The events the soak induces: a worker or the supervisor killed, stopped and continued, a
link flapped, rules churned or loaded by the hundred; each waits for recovery and records it
in its Event."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

from tests.lab.processes import poll
from tests.lab.soak.booking import bulk_rule
from tests.lab.soak.events import Event
from tests.lab.soak.procs import (
    Ident,
    alive,
    ident_of,
    reap_wait,
    send_signal,
    socket_files,
    spawners_of,
)
from tests.lab.soak.settings import (
    BULK_RULES,
    FLAP_S,
    RECOVERY_TIMEOUT,
    SUPERVISOR_STOP_S,
    WORKER_WEDGE_S,
    hang_s,
    pause_s,
)

if TYPE_CHECKING:
    from tests.lab.soak.core import Soak


def inject(soak: Soak, ev: Event) -> None:
    ws = soak.relay.current
    t = time.monotonic()
    before = {wid: w["pid"] for wid, w in ws.items()}
    if ev.kind in ("kill-data", "kill-control", "stop-worker", "pause-worker"):
        signal_worker(soak, ev, ws, t)
    elif ev.kind == "kill-supervisor":
        idents = [w["ident"] for w in ws.values()] + spawners_of(soak.relay.pid)
        ev.victim = f"supervisor (pid {soak.relay.pid})"
        soak.relay.kill()
        died = poll(lambda: not any(alive(i) for i in idents), 5)
        if not died:
            survivors = [i[0] for i in idents if alive(i)]
            ev.problems.append(f"workers {survivors} outlived the supervisor (PDEATHSIG)")
            for i in idents:
                send_signal(i, signal.SIGKILL)
        for i in idents:
            reap_wait(i, 2)
        soak.relay.start()  # as systemd would: the same --state-dir and socket
        if soak.wait_healthy(ev):
            ev.recovery_s = round(time.monotonic() - t, 3)
            soak.check_rules(ev, "restarted supervisor")
            control = str(soak.relay.socket)
            left = [f for f in socket_files(soak.relay.state_dir.parent) if f != control]
            if left:
                ev.problems.append(f"socket files left by the killed supervisor: {left}")
    elif ev.kind == "stop-supervisor":
        ev.victim = f"supervisor (pid {soak.relay.pid})"
        if (ident := ident_of(soak.relay.pid)) is not None:
            soak.stopped.append(ident)
        hold = soak.rng.uniform(*SUPERVISOR_STOP_S)
        soak.relay.pause()
        try:
            time.sleep(hold)  # chaos interval; the soak asks nothing meanwhile
        finally:
            soak.relay.resume()
        ev.hold_s = round(time.monotonic() - t, 2)
        if soak.wait_healthy(ev):
            ev.recovery_s = round(time.monotonic() - t, 3)
            soak.check_rules(ev, "after SIGCONT")
    elif ev.kind == "link-flap":
        ev.victim = soak.rng.choice((soak.c.relay_in, soak.c.relay_out))
        hold = soak.rng.uniform(*FLAP_S)
        soak.c.relay.ip("link", "set", "dev", ev.victim, "down")
        try:
            time.sleep(hold)  # chaos interval
        finally:
            soak.c.relay.ip("link", "set", "dev", ev.victim, "up")
        ev.hold_s = round(time.monotonic() - t, 2)
        if soak.wait_healthy(ev):
            ev.recovery_s = round(time.monotonic() - t, 3)
    elif ev.kind == "churn":
        ev.churn = [soak.churn_once() for _ in range(soak.rng.randint(1, 3))]
        if soak.wait_healthy(ev):
            ev.recovery_s = round(time.monotonic() - t, 3)
    elif ev.kind == "config-load":
        # the soak's rules plus a few hundred more, then back: two loads under traffic
        kept = dict(soak.expected)
        n = soak.rng.randint(*BULK_RULES)
        ev.victim = f"+{n} rules and back"
        bulk = {f"soak-bulk-{i}": bulk_rule(i, soak.c) for i in range(n)}
        for table, when in (({**kept, **bulk}, "after the large load"), (kept, "after it")):
            error = soak.load(table)
            if error:
                ev.problems.append(error)
                break
            if not soak.wait_healthy(ev):
                break
            soak.check_rules(ev, when)
        else:
            ev.recovery_s = round(time.monotonic() - t, 3)
    ev.problems += [op["error"] for op in ev.churn if op["error"]]
    now = soak.relay.current
    ev.replaced = sorted(w for w, pid in before.items() if now.get(w, {}).get("pid") != pid)
    if ev.kind != "none" and (ev.recovery_s is None or ev.recovery_s > WORKER_WEDGE_S):
        took = "never" if ev.recovery_s is None else f"after {ev.recovery_s:.1f} s"
        soak.worker_wedges.append(
            f"{ev.kind} at {ev.at_s:.1f}s: running again {took} (bound {WORKER_WEDGE_S:g} s)"
        )


def signal_worker(soak: Soak, ev: Event, ws: dict[str, dict[str, Any]], t: float) -> None:
    """SIGKILL a worker, or SIGSTOP it and SIGCONT it after a while: before the heartbeat
    timeout (pause-worker: it must carry on) or after it (stop-worker: it must have been
    declared hung and replaced by then)."""
    if ev.kind == "kill-data":
        ev.victim = soak.rng.choice(sorted(k for k, w in ws.items() if w["kind"] == "data"))
    elif ev.kind == "kill-control":
        ev.victim = "control"
    else:
        ev.victim = soak.rng.choice(sorted(ws))
    victim = ws[ev.victim]
    ident: Ident = victim["ident"]
    stop = ev.kind in ("stop-worker", "pause-worker")
    hold = soak.rng.uniform(*(hang_s if ev.kind == "stop-worker" else pause_s)(victim["kind"]))
    if not send_signal(ident, signal.SIGSTOP if stop else signal.SIGKILL):
        ev.problems.append(f"{ev.victim} (pid {victim['pid']}) vanished before the signal")
    if stop:
        soak.stopped.append(ident)
    if ev.kind != "pause-worker" and victim["kind"] == "data" and soak.rng.random() < 0.4:
        ev.churn.append(soak.churn_once())  # while the worker is dead or hung
    if ev.kind == "stop-worker":
        old = victim["pid"]
        left = poll(
            lambda: soak.slot_left(ev.victim, old), RECOVERY_TIMEOUT, 0.02
        )  # the heartbeat timeout must catch it (fine-grained: a data worker's is short)
        if left:
            ev.detected_s = round(time.monotonic() - t, 3)
    if stop:
        time.sleep(max(0.0, t + hold - time.monotonic()))
        send_signal(ident, signal.SIGCONT)  # normally gone by now after a hang
        ev.hold_s = round(time.monotonic() - t, 2)
    replaced = {} if ev.kind == "pause-worker" else {ev.victim: victim["pid"]}
    if soak.wait_healthy(ev, replaced):
        ev.recovery_s = round(time.monotonic() - t, 3)
    if ev.kind != "pause-worker":
        what = "hung worker" if stop else "killed worker"
        soak.gone(ident, ev, what)
