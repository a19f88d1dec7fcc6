"""What the control-socket tests share: one live daemon for all of them (`conftest.live`), the
tally of inputs tried, hypothesis settings, and a valid template of every message a client may
send, with its fields' schema, for the tests to break.
"""

from __future__ import annotations

import collections
from typing import Any

from hypothesis import HealthCheck, settings

from mcrelay.ipc import messages as m
from tests.adversarial import Baseline
from tests.lab.daemon import Daemon

Live = tuple[Daemon, Baseline]
#: How many inputs of each kind were tried, printed when the daemon is stopped.
TRIED: collections.Counter[str] = collections.Counter()


def fuzz(examples: int) -> Any:
    return settings(
        deadline=None,
        max_examples=examples,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


RULE = {
    "id": "fz-rule",
    "input": {"interface": "in0", "group": "239.77.0.1", "port": 7000, "source": None},
    "outputs": [{"group": "239.78.0.1", "port": 7000, "interface": "out0", "ttl": 16}],
}
#: Within a rule: path -> (msgpack kinds the schema accepts there, required).
RULE_FIELDS: dict[tuple[Any, ...], tuple[set[str], bool]] = {
    ("id",): ({"str"}, True),
    ("input",): ({"map"}, True),
    ("input", "interface"): ({"str"}, True),
    ("input", "group"): ({"str"}, True),
    ("input", "port"): ({"int"}, True),
    ("input", "source"): ({"str", "nil"}, False),
    ("outputs",): ({"array"}, True),
    ("outputs", 0): ({"map"}, False),  # an element: wrong type yes, "missing" is not a schema error
    ("outputs", 0, "group"): ({"str"}, True),
    ("outputs", 0, "port"): ({"int"}, True),
    ("outputs", 0, "interface"): ({"str"}, True),
    ("outputs", 0, "ttl"): ({"int"}, False),
}
RULE_MAPS: list[tuple[Any, ...]] = [(), ("input",), ("outputs", 0)]

#: Every message a client may send, as a valid template, with its fields' schema.
TEMPLATES: dict[str, tuple[dict[str, Any], dict[tuple[Any, ...], tuple[set[str], bool]]]] = {
    "hello": (
        {
            "t": "hello",
            "version": 1,
            "role": "client",
            "worker_id": "",
            "pid": 0,
            "log_level": "info",
        },
        {
            ("version",): ({"int"}, True),
            ("role",): ({"str"}, True),
            ("worker_id",): ({"str"}, False),
            ("pid",): ({"int"}, False),
            ("log_level",): ({"str"}, False),
        },
    ),
    "ping": ({"t": "ping"}, {}),
    "workers": ({"t": "workers"}, {}),
    "rules": ({"t": "rules"}, {}),
    "stats-request": ({"t": "stats-request"}, {}),
    "add": (
        {"t": "add", "rule": RULE},
        {("rule",): ({"map"}, True)} | {("rule", *p): s for p, s in RULE_FIELDS.items()},
    ),
    "remove": ({"t": "remove", "id": "fz-none"}, {("id",): ({"str"}, True)}),
    "log-level-request": (
        {"t": "log-level-request", "level": None},
        {("level",): ({"str", "nil"}, False)},
    ),
    "restart-worker": ({"t": "restart-worker", "id": "fz-none"}, {("id",): ({"str"}, True)}),
    "replace-rules": (
        {"t": "replace-rules", "rules": [RULE]},
        {("rules",): ({"array"}, True), ("rules", 0): ({"map"}, False)}
        | {("rules", 0, *p): s for p, s in RULE_FIELDS.items()},
    ),
}
assert set(TEMPLATES) - {"hello"} == {
    t.__struct_config__.tag
    for t in m.ClientRequest.__args__  # type: ignore[attr-defined]
}, "a request type was added: describe it in TEMPLATES"
