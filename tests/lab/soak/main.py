"""The soak's entry point: options, the run in a fresh topology, the report and the exit status
(0 when every check passed)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import prctl

from tests.lab import soak as package
from tests.lab import topology
from tests.lab.soak.checks import final_checks
from tests.lab.soak.core import Soak
from tests.lab.soak.procs import alive, cmdline, is_worker_cmdline, reap_wait, send_signal
from tests.lab.soak.relay import Relay, Sampler
from tests.lab.soak.report import by_kind, render
from tests.lab.soak.settings import QUIET_KINDS, SETTINGS_NOTE, Options


class Interrupted(Exception):
    """SIGTERM: unwind like Ctrl-C so every finally block cleans up."""


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
    parser = argparse.ArgumentParser(
        prog="scripts/soak", description=(package.__doc__ or "").split("\n\n")[0]
    )
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
