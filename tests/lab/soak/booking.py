"""The soak's bookkeeping of rules: the fields it compares with `rules --json`, and the rules
of a bulk config load."""

from __future__ import annotations

from typing import Any

from tests.lab import topology

#: The fields of a listed rule the soak books; the daemon may list more (fields are added to
#: `rules --json`, never renamed), which the comparison leaves out.
BOOKED_INPUT = ("interface", "group", "port", "source")
BOOKED_OUTPUT = ("group", "port", "interface", "ttl")


def as_booked(rule: dict[str, Any]) -> dict[str, Any]:
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
