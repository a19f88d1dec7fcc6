"""The flow the relay tests send (GROUP:PORT in, OUT_GROUP:OUT_PORT out), adding a rule for it
through the CLI, and reading the relay's stats."""

from __future__ import annotations

import json

from tests.lab import topology
from tests.lab.daemon import Daemon

GROUP, PORT = "239.1.1.1", 5000
OUT_GROUP, OUT_PORT = "239.2.2.2", 5001


def add(d: Daemon, c: topology.Chain, *outputs: str, group: str = GROUP, port: int = PORT,
        interface: str | None = None, extra: tuple[str, ...] = ()) -> str:  # fmt: skip
    args = ["add", "--input-interface", interface or c.relay_in, "--input-group", group,
            "--input-port", str(port), *extra]  # fmt: skip
    for out in outputs:
        args += ["--output", out]
    return d.ok(*args).strip()


def stats(d: Daemon) -> dict[str, object]:
    return json.loads(d.ok("stats", "--json"))
