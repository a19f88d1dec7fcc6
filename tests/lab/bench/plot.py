"""The loss plot of scripts/bench (matplotlib, imported only here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.lab.bench.summary import MAIN, summarize


def write_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r["phase"] in MAIN]
    labels = {k: v["label"] for k, v in results.get("systems", {}).items()}
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    markers = "os^vDP*X"
    systems: list[str] = []
    for r in runs:
        if r["system"] not in systems:
            systems.append(r["system"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    summary = results.get("summary") or summarize(results)
    for i, name in enumerate(systems):
        color, mk = colors[i % len(colors)], markers[i % len(markers)]
        rr = [r for r in runs if r["system"] == name]
        # every run (fixed and bisection, every repeat) as a point; hollow when disturbed
        for r in rr:
            ax.plot(
                r["offered_pps"] / 1000, max(r["loss_pct"], 0.0), ls="", marker=mk, ms=5,
                color=color, alpha=0.5, mfc="none" if r.get("disturbed") else color,
            )  # fmt: skip
        # the line: medians over repeats at each fixed rate
        pts = sorted(
            (f["offered_pps"]["median"] / 1000, f["loss_pct"]["median"])
            for f in summary[name]["fixed"].values()
            if f["offered_pps"] and f["loss_pct"]
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=mk, color=color, lw=1.5,
                    label=labels.get(name, name))  # fmt: skip
    ax.axhline(0.1, color="grey", ls=":", lw=1)
    ax.text(ax.get_xlim()[0], 0.1, " 0.1 %", va="bottom", color="grey", fontsize=8)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(-0.02, 100)
    ax.set_xlabel("offered rate, thousand datagrams/s (measured at the generator)")
    ax.set_ylabel("loss % (symlog)")
    mach = results["machine"]
    ax.set_title(
        f"Loss vs offered rate, {results['config']['size']} B payload, {results['mode']} mode\n"
        f"{mach['nproc']} × {mach['cpu_model']}, Linux {mach['kernel']}, {mach['date'][:10]}",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.plot([], [], ls="", marker="o", color="grey", alpha=0.5, label="single runs (median line)")
    ax.plot([], [], ls="", marker="o", mfc="none", mec="grey", label="disturbed by others' load")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
