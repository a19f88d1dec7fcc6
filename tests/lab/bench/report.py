"""The Markdown report of scripts/bench, from results.json alone (`scripts/bench
--report-only` redraws it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.lab.bench.summary import spread, where_lost


def _rate(rate: int) -> str:
    return f"{rate // 1000}k" if rate else "unpaced"


def _k(x: float | None) -> str:
    return "–" if x is None else f"{x / 1000:,.0f}k"


def _f(x: float | None, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _sp(s: dict[str, Any] | None, fmt: Callable[[Any], str] = _f) -> str:
    if not s:
        return "–"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    s = results["summary"]
    cfg = results["config"]
    mach = results["machine"]
    labels = {k: v["label"] for k, v in results.get("systems", {}).items()}
    rc, oc = cfg["relay_cpu"], cfg["other_cpu"]
    runs = results["runs"]
    L: list[str] = []
    add = L.append
    add(f"# mcrelay benchmark results ({results['mode']} mode)\n")
    add(
        f"`{cfg['command']}` — {cfg['count']:,} datagrams of {cfg['size']} B per run, "
        f"{cfg['flows']} flows, {cfg['repeat']} repeat(s), loss limit {cfg['loss_limit_pct']} %. "
        f"Medians, with (min–max) over repeats. Method and caveats: "
        f"[README.md]({'README.md' if results['mode'] == 'full' else '../README.md'}); "
        f"plot: [loss.png](loss.png).\n"
    )
    add(
        f"Machine: {mach['nproc']} × {mach['cpu_model']} ({mach['hypervisor']} guest), "
        f"{mach['memory_gib']} GiB, Linux {mach['kernel']}, {mach['os']}, Python "
        f"{mach['python']}, mcrelay {mach['mcrelay']}, {mach['socat']}, {mach['smcroute']}; "
        f"{mach['date']}"
        + (f", whole run {results['elapsed_s']:.0f} s" if results.get("elapsed_s") else "")
        + ".\n"
    )
    add(
        f"Placement: relay (every relay process) pinned to CPU {rc} with its input veth's "
        f"receive work steered there (RPS); generator and sink pinned to CPU {oc}, sink receive "
        f"work steered there. Generator: {results['generator']}. Sink: {results['sink']}.\n"
    )
    add("## Highest rate with < 0.1 % loss\n")
    add(
        "| system | highest lossless pps | relay CPU µs/pkt (processes) | relay core µs/pkt "
        "(/proc/stat) | p50 / p99 latency µs | runs disturbed |"
    )
    add("|---|---|---|---|---|---|")
    for name, v in s.items():
        if name == "ratios":
            continue
        h = v["highest_lossless_pps"]
        at = v["at_highest"]
        ge = "≥ " if v["generator_bound"] else ""
        best = f"{ge}{_sp(h, _k)}"
        if v.get("below_pps") and not (h and h["median"]):
            best = f"< {_k(v['below_pps'])} (lossy at every rate tried)"
        cpu = _f(at["relay_cpu_us_per_pkt"])
        if name == "kernel":
            cpu = "n/a (softirq)"
        elif name == "gen-ceiling":
            cpu = "–"
        add(
            f"| {labels.get(name, name)} | {best} | {cpu} | "
            f"{_f(at['relay_core_us_per_pkt'])} | {_f(at['lat_p50_us'], 0)} / "
            f"{_f(at['lat_p99_us'], 0)} | {v.get('disturbed', '–')} |"
        )
    add(
        "\n“≥” marks a system that was lossless at every offered rate, up to what the generator "
        "could offer: its real limit is higher. The processes column is utime+stime of every "
        "relay process (mcrelay: supervisor and all workers; socat: its process; kernel "
        "forwarding runs in softirq, which no process is charged for) per datagram received "
        f"at the sink; the core column is the busy time (neither idle nor stolen by the "
        f"hypervisor) of CPU {rc} per datagram, which includes the kernel's receive and "
        "transmit work for the relay and is comparable across systems — and also includes "
        "whatever other users ran on that CPU (see “runs disturbed” and README.md).\n"
    )
    if s.get("ratios"):
        add("### Ratios of highest lossless rates\n")
        add("| ratio | value | note |")
        add("|---|---|---|")
        for k, v in s["ratios"].items():
            note = v["note"]
            gt = "> " if note.startswith("lower") else "≤ " if note.startswith("upper") else ""
            add(f"| {k} | {gt}{v['ratio']:.2f} | {v['note']} |")
        add("")
    add("## Every fixed rate\n")
    add(
        "| system | offered | offered (measured) | at sink pps | loss % | relay CPU µs/pkt | "
        "relay core µs/pkt | p50 µs | p99 µs | others' CPU % | where lost (last repeat) |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, v in s.items():
        if name == "ratios":
            continue
        for rate, f in v["fixed"].items():
            last = [
                r for r in runs
                if r["system"] == name and r["phase"] == "fixed" and str(r["target_pps"]) == rate
            ][-1]  # fmt: skip
            add(
                f"| {name} | {_rate(int(rate))} | {_sp(f['offered_pps'], _k)} | "
                f"{_sp(f['achieved_pps'], _k)} | {_sp(f['loss_pct'], lambda x: _f(x, 3))} | "
                f"{'n/a' if name == 'kernel' else _sp(f['relay_cpu_us_per_pkt'])} | "
                f"{_sp(f['relay_core_us_per_pkt'])} | "
                f"{_sp(f['lat_p50_us'], lambda x: _f(x, 0))} | "
                f"{_sp(f['lat_p99_us'], lambda x: _f(x, 0))} | "
                f"{_sp(f['foreign_cpu_pct'], lambda x: _f(x, 0))} | {where_lost(last, rc, oc)} |"
            )
    search = [r for r in runs if r["phase"] == "search"]
    if search:
        add("\nBisection steps: " + "; ".join(
            f"{r['system']} {_k(r['offered_pps'])} → {r['loss_pct']:.3f} %" for r in search
        ) + ".\n")  # fmt: skip
    _extras(results, L, rc, oc)
    _input_section(results, L)
    _priority_section(results, L, rc, oc)
    path.write_text("\n".join(L) + "\n")


def _cpu(name: str, value: float | None) -> str:
    return "n/a" if name == "kernel" else _f(value)


def _run_row(r: dict[str, Any], rc: int, oc: int, first: str) -> str:
    return (
        f"| {first} | {_rate(r['target_pps'])} | {_k(r['offered_pps'])} | "
        f"{_k(r['achieved_pps'])} | {r['loss_pct']:.3f} | "
        f"{_cpu(r['system'], r['relay_cpu_us_per_pkt'])} | "
        f"{_f(r['relay_core_us_per_pkt'])} | {_f(r['lat_p50_us'], 0)} | "
        f"{_f(r['lat_p99_us'], 0)} | {r.get('foreign_cpu_pct', 0):.0f} | {where_lost(r, rc, oc)} |"
    )


_HEAD = (
    "| {} | offered | offered (measured) | at sink pps | loss % | relay CPU µs/pkt | "
    "relay core µs/pkt | p50 µs | p99 µs | others' CPU % | where lost |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _extras(results: dict[str, Any], L: list[str], rc: int, oc: int) -> None:
    add = L.append
    ex = results.get("extras", {})
    runs = results["runs"]
    if "unroutable" in ex:
        add("## Unroutable source\n")
        if "error" in ex["unroutable"]:
            add(f"Failed: {ex['unroutable']['error']}\n")
        else:
            add(f"{ex['unroutable']['description']}.\n")
            add(_HEAD.format("system"))
            for r in (r for r in runs if r["phase"] == "unroutable"):
                add(_run_row(r, rc, oc, r["system"]))
            add(
                "\nKernel forwarding and socat relay nothing here: the reverse-path filter drops "
                "every datagram before the multicast route or the socket sees it. mcrelay "
                "captures before that check.\n"
            )
    if "placement" in ex:
        add("## Placement\n")
        if "error" in ex["placement"]:
            add(f"Failed: {ex['placement']['error']}\n")
        else:
            add(
                "Same runs under other placements (`free`: no pinning, no RPS — the scheduler "
                "decides and veth delivers in the sender's context; `single`: everything on "
                f"CPU {oc}). Compare with the `split` rows above.\n"
            )
            add(_HEAD.format("placement / system"))
            for r in (r for r in runs if r["phase"] in ("free", "single")):
                add(_run_row(r, rc, oc, f"{r['phase']} / {r['system']}"))
            add("")
    if "control" in ex:
        c = ex["control"]
        add("## Control plane under load\n")
        if "error" in c:
            add(f"Failed: {c['error']}\n")
        else:
            add(
                f"mcrelay (1 worker) relaying {c['rate']:,} pps; `workers` and `add` requests "
                "alternate back to back (10 ms apart) through `mcrelay.client.request`. Loss "
                f"during the requests: {c['loss_pct_with_requests']:.3f} % (same rate without "
                f"requests: {c['loss_pct_without']:.3f} %).\n"
            )
            add("| request | when | n | p50 ms | p99 ms | max ms |")
            add("|---|---|---|---|---|---|")
            for when, key in (("idle", "idle"), ("under load", "under_load")):
                for req, v in c.get(key, {}).items():
                    add(
                        f"| {req} | {when} | {v['n']} | {_f(v['p50_ms'])} | {_f(v['p99_ms'])} | "
                        f"{_f(v['max_ms'])} |"
                    )
            add("")
    if "rules" in ex:
        rr = ex["rules"]
        add("## 1 rule vs 1,000 rules\n")
        if "error" in rr:
            add(f"Failed: {rr['error']}\n")
        else:
            add(
                "mcrelay (1 worker): the benchmark rule alone, then with 999 more rules on the "
                "same input interface (other groups and ports, each with its own output group). "
                f"Installing the 1,000 rules (one `replace-rules` request) took "
                f"{', '.join(f'{x:.2f}' for x in rr['install_s'])} s.\n"
            )
            add(_HEAD.format("rules"))
            for r in (r for r in runs if r["phase"].startswith("rules-")):
                add(_run_row(r, rc, oc, r["phase"][6:]))
            add("")
    if "fanout" in ex:
        fo = ex["fanout"]
        add("## Fan-out 1 → 3\n")
        if "error" in fo:
            add(f"Failed: {fo['error']}\n")
        else:
            add(
                "mcrelay (1 worker), one rule with three outputs (239.2.2.2/3/4:5001 on rout0); "
                "the sink counts each output separately. Offered is the input rate; at-sink and "
                "µs/pkt are per output datagram (×3 for per input datagram).\n"
            )
            add("| input rate | offered | at sink pps (all outputs) | loss % (worst output) | "
                "relay CPU µs/output pkt | relay core µs/output pkt | p50 µs | p99 µs | "
                "where lost |")  # fmt: skip
            add("|---|---|---|---|---|---|---|---|---|")
            for r in (r for r in runs if r["phase"] == "fanout-3"):
                sent = r["sent"]
                worst = max(
                    (100 * (sent - v) / sent for v in r["per_dest"].values()), default=100.0
                ) if sent else 0.0  # fmt: skip
                if len(r["per_dest"]) < 3:
                    worst = 100.0
                add(
                    f"| {_rate(r['target_pps'])} | {_k(r['offered_pps'])} | "
                    f"{_k(r['achieved_pps'])} | {worst:.3f} | "
                    f"{_f(r['relay_cpu_us_per_pkt'])} | {_f(r['relay_core_us_per_pkt'])} | "
                    f"{_f(r['lat_p50_us'], 0)} | {_f(r['lat_p99_us'], 0)} | "
                    f"{where_lost(r, rc, oc)} |"
                )
            add("")


def _input_section(results: dict[str, Any], L: list[str]) -> None:
    ex = results.get("extras", {}).get("input")
    if not ex:
        return
    add = L.append
    add("## What the relay core spends before any relay runs\n")
    if "error" in ex:
        add(f"Failed: {ex['error']}\n")
        return
    runs = [r for r in results["runs"] if r["phase"].startswith("input-")]
    add(
        f"{ex['rate']:,} pps into the relay namespace with nothing relaying; busy time of the "
        "relay core (which RPS gives the input path) per offered datagram.\n"
    )
    add("| relay namespace holds | core µs per datagram, undisturbed runs | all runs |")
    add("|---|---|---|")
    labels = {
        "input-none": "nothing (IP input drops the unjoined group)",
        "input-join": "a joined socket with a drop-all filter (mcrelay's IGMP membership)",
        "input-ring": "that + an AF_PACKET TPACKET_V3 ring (blocks returned unread)",
    }
    for phase, label in labels.items():
        rr = [r for r in runs if r["phase"] == phase]
        clean = [r for r in rr if not r.get("disturbed")]
        if rr:
            add(
                f"| {label} | {_sp(spread([r['relay_core_us_per_sent'] for r in clean]))} "
                f"({len(clean)} of {len(rr)} runs) | "
                f"{_sp(spread([r['relay_core_us_per_sent'] for r in rr]))} |"
            )
    add(
        "\nNothing of the benchmark runs on the relay core here but the idle holder, so any "
        "user or system time sampled there is someone else's: such runs are “disturbed”.\n"
    )


def _priority_section(results: dict[str, Any], L: list[str], rc: int, oc: int) -> None:
    ex = results.get("extras", {}).get("priority")
    if not ex:
        return
    add = L.append
    add("## mcrelay past its limit: data worker priority\n")
    if "error" in ex:
        add(f"Failed: {ex['error']}\n")
        return
    add(
        "mcrelay (1 worker) with its data worker at nice 0 (as shipped) and at nice −10 (set "
        "by the benchmark), offered more than it can relay. On the relay core the worker "
        "competes with the kernel's receive work once that is deferred to ksoftirqd.\n"
    )
    add(_HEAD.format("worker nice"))
    for r in (r for r in results["runs"] if r["phase"].startswith("nice-")):
        add(_run_row(r, rc, oc, r["phase"][5:]))
    add("")
