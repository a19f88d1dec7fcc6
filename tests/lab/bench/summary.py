"""Summaries of scripts/bench's results: medians and spreads per system and rate, and where
the loss of a run happened."""

from __future__ import annotations

import statistics
from typing import Any

MAIN = ("fixed", "search")


def rate_key(rate: int) -> float:
    return rate or float("inf")


def _med(values: list[float]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def spread(values: list[float]) -> dict[str, Any] | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def where_lost(r: dict[str, Any], relay_cpu: int, other_cpu: int) -> str:
    """The drop counters that moved in a run, by place; '' when none did."""
    c = r.get("counters", {})
    sn = r.get("softnet_drops", {})
    parts = []
    if sn.get(str(relay_cpu)):
        parts.append(f"relay-CPU backlog {sn[str(relay_cpu)]:,}")
    if c.get("ring_drops"):
        parts.append(f"mcrelay ring {c['ring_drops']:,}")
    if c.get("udp_RcvbufErrors"):
        parts.append(f"socket rcvbuf {c['udp_RcvbufErrors']:,}")
    if c.get("out_errors") or c.get("udp_SndbufErrors"):
        parts.append(f"egress {c.get('out_errors', 0) + c.get('udp_SndbufErrors', 0):,}")
    sink = r.get("sink_ring_drops", 0) + sn.get(str(other_cpu), 0)
    if sink:
        parts.append(f"sink side {sink:,}")
    return ", ".join(parts)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    runs = [r for r in results["runs"] if r["phase"] in MAIN]
    order: list[str] = []
    for r in runs:
        if r["system"] not in order:
            order.append(r["system"])
    out: dict[str, Any] = {}
    for name in order:
        mine = [r for r in runs if r["system"] == name]
        best_values, best_runs, bound = [], [], False
        below: list[float] = []  # repeats with no lossless run: the lowest lossy rate
        for rep in sorted({r.get("repeat", 0) for r in mine}):
            rr = [r for r in mine if r.get("repeat", 0) == rep]
            # the highest lossless run counts (loss can come from other users' load,
            # losslessness cannot); a repeat without lossy runs above it is generator-bound
            ok = [r for r in rr if r["lossless"]]
            top = max((r["offered_pps"] for r in ok), default=0.0)
            lossy = [r["offered_pps"] for r in rr if not r["lossless"] and r["offered_pps"] > top]
            bound |= not lossy
            if ok:
                b = max(ok, key=lambda r: r["offered_pps"])
                best_values.append(b["offered_pps"])
                best_runs.append(b)
            else:
                best_values.append(0.0)
                below.append(min(r["offered_pps"] for r in rr))
        fixed: dict[str, Any] = {}
        for rate in sorted({r["target_pps"] for r in mine if r["phase"] == "fixed"}, key=rate_key):
            rr = [r for r in mine if r["phase"] == "fixed" and r["target_pps"] == rate]
            fixed[str(rate)] = {
                k: spread([r[k] for r in rr])
                for k in (
                    "offered_pps",
                    "achieved_pps",
                    "loss_pct",
                    "relay_cpu_us_per_pkt",
                    "relay_core_us_per_pkt",
                    "lat_p50_us",
                    "lat_p99_us",
                    "foreign_cpu_pct",
                )
            }
        n_bad = sum(1 for r in mine if r.get("disturbed"))
        out[name] = {
            "disturbed": f"{n_bad}/{len(mine)}",
            "highest_lossless_pps": spread(best_values),
            "generator_bound": bound,
            "below_pps": min(below) if below else None,
            "at_highest": {
                k: _med([r[k] for r in best_runs])
                for k in (
                    "relay_cpu_us_per_pkt",
                    "relay_core_us_per_pkt",
                    "lat_p50_us",
                    "lat_p99_us",
                )
            },
            "fixed": fixed,
        }
    ratios = {}
    for mc in ("mcrelay-1w", "mcrelay-2w"):
        if mc not in out or not out[mc]["highest_lossless_pps"]:
            continue
        mine = out[mc]["highest_lossless_pps"]["median"]
        for other in ("socat", "socat-8m", "kernel", "gen-ceiling"):
            theirs = (out.get(other) or {}).get("highest_lossless_pps")
            if theirs and not theirs["median"] and out[other].get("below_pps"):
                ratios[f"{mc}/{other}"] = {
                    "ratio": round(mine / out[other]["below_pps"], 2),
                    "note": f"lower bound: {other} was lossy at every rate tried",
                }
            elif theirs and theirs["median"]:
                ratios[f"{mc}/{other}"] = {
                    "ratio": round(mine / theirs["median"], 2),
                    "note": (
                        "upper bound: the other system was never lossy (generator-bound)"
                        if out[other]["generator_bound"]
                        else "lower bound: mcrelay was never lossy"
                        if out[mc]["generator_bound"]
                        else ""
                    ),
                }
    return {**out, "ratios": ratios}
