"""Figures per event kind and the human-readable report."""

from __future__ import annotations

import statistics
from typing import Any

from tests.lab.soak.events import Event
from tests.lab.soak.settings import BULK_RULES, KINDS, QUIET_KINDS, SIZE, STREAMS, WARMUP_S


def nonzero(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items() if v)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- final checks and report ----------------------------------------------------------------


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
        rec = f"{fmt(s['recovery_s_median'])}/{fmt(s['recovery_s_max'])}"
        mean, top = s["lost_per_event_mean"], s["lost_per_event_max"]
        lines.append(f"{kind:20} {s['events']:>4} {s['lost']:>11} {mean:>11} {top:>7} {rec:>19}")
    dropped = [(kind, nonzero(s["drops"])) for kind, s in report["by_kind"].items()]
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
