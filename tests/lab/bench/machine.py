"""What machine a benchmark ran on: CPU, hypervisor, kernel, OS and the tools' versions."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from tests.lab.bench.topology import ROOT


def sh(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    lscpu = {
        k.strip(): v.strip()
        for k, _, v in (ln.partition(":") for ln in sh("lscpu").splitlines())
        if v
    }
    git = sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = bool(sh("git", "-C", str(ROOT), "status", "--porcelain", "--", "mcrelay"))
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "hypervisor": lscpu.get("Hypervisor vendor", "none"),
        "kernel": platform.release(),
        "os": sh("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "mcrelay": f"{git}{' (mcrelay/ modified)' if dirty else ''}",
        "socat": sh("sh", "-c", "socat -V | sed -n 2p"),
        "smcroute": sh("smcrouted", "-v").splitlines()[0] if sh("smcrouted", "-v") else "",
    }
