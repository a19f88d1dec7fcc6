"""Untrusted requests on the control socket of a live daemon: random bytes, random msgpack,
schema violations of every message a client may send, and well-typed requests with bad values.

The control worker is the only process that parses client input. Whatever a client sends, it
gets either ``Reply(ok=False, error=...)`` or a closed connection (usually both), never a
traceback; and afterwards the daemon still answers a fresh client, no worker was replaced, and
the rule table is what it was (``assert_healthy`` after every example).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mcrelay.ipc import messages as m
from mcrelay.ipc.replies import public
from mcrelay.system.logs import LOG_LEVELS
from tests.adversarial import (
    HEADER,
    HELLO,
    Raw,
    assert_healthy,
    assert_refused,
    call,
    exchange,
    frame,
    workers_of,
)
from tests.adversarial.control import RULE, RULE_MAPS, TEMPLATES, TRIED, Live, fuzz

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=16)
)
#: Any msgpack value: maps with string or integer keys, arrays, nested a few levels.
msgpack_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-100, 100), inner, max_size=4)
    ),
    max_leaves=12,
)
KINDS: dict[str, st.SearchStrategy[Any]] = {
    "nil": st.none(),
    "bool": st.booleans(),
    "int": st.integers(-(2**63), 2**64 - 1),
    "float": st.floats(),
    "str": st.text(max_size=16),
    "bin": st.binary(max_size=16),
    "array": st.lists(msgpack_values, max_size=3),
    "map": st.dictionaries(st.text(max_size=8), msgpack_values, max_size=3),
}
MAPS: dict[str, list[tuple[Any, ...]]] = {
    "add": [(), *(("rule", *p) for p in RULE_MAPS)],
    "replace-rules": [(), *(("rules", 0, *p) for p in RULE_MAPS)],
}
#: Tags of other conversations: valid messages, but not from a client.
FOREIGN_TAGS = ["reply", "control-request", "control-reply", "hb", "hb-ack", "rule-sync", "stop"]


def _copy(value: Any) -> Any:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value))


def _parent(doc: Any, path: tuple[Any, ...]) -> tuple[Any, Any]:
    for key in path[:-1]:
        doc = doc[key]
    return doc, path[-1]


def _known_keys(doc: dict[str, Any], path: tuple[Any, ...]) -> set[Any]:
    target: Any = doc
    for key in path:
        target = target[key]
    return set(target)


@st.composite
def malformed(draw: st.DrawFn, tag: str) -> tuple[str, Any]:
    """A schema-invalid version of message ``tag``: (mutation name, value)."""
    template, fields = TEMPLATES[tag]
    doc = _copy(template)
    mutations = ["extra-field", "unknown-tag", "no-tag", "not-a-map"]
    if fields:
        mutations.append("wrong-type")
    required = [p for p, (_, req) in fields.items() if req]
    if required:
        mutations.append("missing-field")
    mutation = draw(st.sampled_from(mutations))
    if mutation == "wrong-type":
        path = draw(st.sampled_from(sorted(fields, key=str)))
        allowed = fields[path][0]
        kind = draw(st.sampled_from(sorted(set(KINDS) - allowed)))
        parent, key = _parent(doc, path)
        parent[key] = draw(KINDS[kind])
    elif mutation == "missing-field":
        parent, key = _parent(doc, draw(st.sampled_from(sorted(required, key=str))))
        del parent[key]
    elif mutation == "extra-field":
        where = draw(st.sampled_from(MAPS.get(tag, [()])))
        known = _known_keys(doc, where)
        key = draw(st.text(max_size=12).filter(lambda k: k not in known))
        target = doc
        for step in where:
            target = target[step]
        target[key] = draw(msgpack_values)
    elif mutation == "unknown-tag":
        tags = {*TEMPLATES}
        doc["t"] = draw(
            st.sampled_from(FOREIGN_TAGS)
            | st.text(max_size=20).filter(lambda t: t not in tags)
            | KINDS["int"]
            | KINDS["nil"]
            | KINDS["bin"]
        )
    elif mutation == "no-tag":
        del doc["t"]
    else:
        doc = draw(st.sampled_from(sorted(set(KINDS) - {"map"})).flatmap(KINDS.get))
    return mutation, doc


# Well-typed values: the control worker's validation, not the schema, must judge them. A rule
# is valid but for at most one field, so that a third or more are accepted and reach the data
# worker, and each odd value is judged with everything else right.
VALID = {
    "id": st.from_regex(r"\Afz-[a-z0-9]{1,8}\Z"),
    "interface": st.from_regex(r"\A(in|out)[0-9]{1,3}\Z"),
    "group": st.ip_addresses(v=4, network="239.0.0.0/8").map(str)
    | st.ip_addresses(v=4, network="10.0.0.0/8").map(str),
    "source": st.none() | st.ip_addresses(v=4, network="10.0.0.0/8").map(str),
    "port": st.integers(1, 65535),
    "ttl": st.integers(1, 255),
    "vlan": st.none() | st.integers(1, 4094),
}
_odd_names = st.sampled_from(
    ["", "a\x00b", "eth0\n", "é" * 8, "x" * 15, "x" * 16, "a/b", "a:b", "a b"]
) | st.text(max_size=20)
_odd_addresses = (
    st.sampled_from(
        [
            *("224.0.0.5", "0.0.0.0", "255.255.255.255", "239.1.1.1\n", "1.2.3", "::1"),
            *("239.1.1.01", " 10.0.0.1", "10.0.0.1\x00"),
        ]
    )
    | st.ip_addresses(v=4).map(str)
    | st.text(max_size=20)
)
_odd_ints = st.sampled_from([0, 65536, 256, -1, 2**64 - 1, -(2**63)]) | KINDS["int"]
ODD = {
    "id": st.sampled_from(["", "a" * 64, "a" * 65, "-x", "abc\n", "a\x00b", "base-1", "a.b:c_d-e"])
    | st.text(max_size=70),
    "interface": _odd_names,
    "group": _odd_addresses,
    "source": _odd_addresses,
    "port": _odd_ints,
    "ttl": _odd_ints,
    "vlan": _odd_ints | st.sampled_from([4095, 0]),
}
#: Where a rule's odd value may go: (path, kind of value).
ODD_PLACES = [
    (("id",), "id"),
    (("input", "interface"), "interface"),
    (("input", "group"), "group"),
    (("input", "source"), "source"),
    (("input", "port"), "port"),
    (("input", "vlan"), "vlan"),
    *(
        (("outputs", i, key), kind)
        for i in range(2)
        for key, kind in [
            ("interface", "interface"),
            ("group", "group"),
            ("port", "port"),
            ("ttl", "ttl"),
        ]
    ),
    (("outputs",), "outputs"),
]


def _valid_output(i: int) -> dict[str, Any]:
    return {"group": f"239.78.{i // 250}.{i % 250 + 1}", "port": 7000, "interface": "out0"}


@st.composite
def well_typed_rules(draw: st.DrawFn) -> dict[str, Any]:
    outputs = [
        {
            "group": draw(VALID["group"]),
            "port": draw(VALID["port"]),
            "interface": draw(VALID["interface"]),
            "ttl": draw(VALID["ttl"]),
        }
        for _ in range(2)
    ]
    rule: dict[str, Any] = {
        "id": draw(VALID["id"]),
        "input": {
            "interface": draw(VALID["interface"]),
            "group": draw(VALID["group"]),
            "port": draw(VALID["port"]),
            "source": draw(VALID["source"]),
            "vlan": draw(VALID["vlan"]),
        },
        "outputs": outputs[: draw(st.integers(1, 2))],
    }
    place = draw(st.none() | st.sampled_from(ODD_PLACES) | st.sampled_from(ODD_PLACES))
    if place is not None:
        path, kind = place
        if kind == "outputs":
            rule["outputs"] = draw(
                st.just([])
                | st.integers(64, 66).map(lambda n: [_valid_output(i) for i in range(n)])
            )
        elif path[0] != "outputs" or path[1] < len(rule["outputs"]):
            parent, key = _parent(rule, path)
            parent[key] = draw(ODD[kind])
    return rule


INVALID_RULE = {**RULE, "input": {**RULE["input"], "port": 0}}


def _check_answered(outcome: Any) -> None:
    """Random input: every frame decodes as a reply; errors are messages, never tracebacks."""
    assert b"Traceback" not in outcome.raw
    assert outcome.tail == b""
    assert outcome.closed, outcome.frames
    for i, f in enumerate(outcome.frames):
        if isinstance(f, m.Hello):  # random bytes that happened to be a hello
            assert i == 0 and f.role == "control", outcome.frames
            continue
        assert isinstance(f, m.Reply), f
        if not f.ok:
            assert isinstance(f.error, str) and f.error, f


# --- random bytes and random msgpack ----------------------------------------------------------


@fuzz(150)
@given(data=st.binary(max_size=4096), hello=st.booleans(), framed=st.booleans())
def test_random_bytes(live: Live, data: bytes, hello: bool, framed: bool) -> None:
    d, base = live
    TRIED["random bytes" + (" (framed)" if framed else "")] += 1
    payload = HEADER.pack(len(data)) + data if framed else data
    _check_answered(exchange(d.socket, payload, hello=hello))
    assert_healthy(d, base)


@fuzz(150)
@given(value=msgpack_values, hello=st.booleans())
def test_random_msgpack_values(live: Live, value: Any, hello: bool) -> None:
    d, base = live
    TRIED["random msgpack values"] += 1
    _check_answered(exchange(d.socket, frame(value), hello=hello))
    assert_healthy(d, base)


# --- schema violations for every message a client may send -------------------------------------


@pytest.mark.parametrize("tag", sorted(TEMPLATES))
@fuzz(25)
@given(data=st.data())
def test_schema_violations(live: Live, tag: str, data: st.DataObject) -> None:
    """Wrong types, missing and extra fields, unknown tags: one protocol error, then hang-up."""
    d, base = live
    mutation, value = data.draw(malformed(tag), label="mutation")
    TRIED[f"schema: {mutation}"] += 1
    # A hello is the first frame; requests follow a valid hello.
    outcome = exchange(d.socket, frame(value), hello=tag != "hello", shut=False)
    assert_refused(outcome, protocol_error=True)
    assert_healthy(d, base)


def test_deeply_nested_value_before_the_tag(live: Live) -> None:
    """msgspec recurses to skip an unknown value while it looks for the tag: RecursionError used
    to escape the channel and crash the control worker."""
    d, base = live
    nested = b"\x91" * 100_000 + b"\xc0"
    for hello in (True, False):
        TRIED["deeply nested value"] += 1
        body = b"\x82\xa1x" + nested + b"\xa1t\xa4ping"
        outcome = exchange(d.socket, HEADER.pack(len(body)) + body, hello=hello, shut=False)
        assert_refused(outcome, protocol_error=True)
        assert_healthy(d, base)


# --- well-typed requests with bad values --------------------------------------------------------


def _rule_with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    rule = _copy(RULE)
    parent, key = _parent(rule, path)
    parent[key] = value
    return rule


@fuzz(150)
@given(rule=well_typed_rules())
# Found by this test: accepted, then fatal to if_nametoindex in the data worker (crash loop) or
# in the supervisor's membership code (traceback in the log).
@example(rule=_rule_with(("outputs", 0, "interface"), "o\x00b"))
@example(rule=_rule_with(("input", "interface"), "i\x00b"))
@example(rule=_rule_with(("input", "interface"), "in0\n"))
@example(rule=_rule_with(("id",), "fz-newline\n"))
def test_add_rule_values(live: Live, rule: dict[str, Any]) -> None:
    """Refused with a reason (connection kept) or added; an added rule harms no worker."""
    d, base = live
    TRIED["add: well-typed values"] += 1
    outcome = exchange(d.socket, frame({"t": "add", "rule": rule}))
    assert b"Traceback" not in outcome.raw and outcome.closed and outcome.tail == b""
    (reply,) = outcome.frames  # one answer: a value problem is not a protocol error
    assert isinstance(reply, m.Reply)
    if reply.ok:
        TRIED["add: accepted"] += 1
        assert public(reply.result) == {"id": rule["id"]}
        assert workers_of(d.socket) == base.workers  # the data worker survived installing it
        call(d.socket, m.RemoveRule(id=rule["id"]))
    else:
        assert reply.error and not reply.error.startswith("protocol error"), reply.error
    assert_healthy(d, base)


@fuzz(100)
@given(rules=st.lists(well_typed_rules(), max_size=3), where=st.integers(0, 3))
def test_replace_rules_with_an_invalid_rule_changes_nothing(
    live: Live, rules: list[dict[str, Any]], where: int
) -> None:
    d, base = live
    TRIED["replace-rules: one invalid"] += 1
    rules.insert(min(where, len(rules)), INVALID_RULE)
    outcome = exchange(d.socket, frame({"t": "replace-rules", "rules": rules}))
    assert_refused(outcome)
    assert len(outcome.frames) == 1
    assert_healthy(d, base)


worker_ids = st.text(max_size=20).filter(lambda s: s not in ("control", "data-0"))
odd_requests = st.one_of(
    st.builds(
        lambda i: {"t": "remove", "id": i},
        (VALID["id"] | ODD["id"]).filter(lambda s: "base" not in s),
    ),
    st.builds(lambda i: {"t": "restart-worker", "id": i}, worker_ids),
    st.builds(
        lambda lv: {"t": "log-level-request", "level": lv},
        st.text(max_size=20).filter(lambda s: s not in LOG_LEVELS),
    ),
)


@fuzz(100)
@given(request=odd_requests)
def test_unknown_ids_and_levels(live: Live, request: dict[str, Any]) -> None:
    """Refused with a reason; the connection stays usable."""
    d, base = live
    TRIED[f"{request['t']}: unknown value"] += 1
    conn = Raw(d.socket)
    try:
        conn.send(HELLO + frame(request) + frame({"t": "ping"}))
        hello, refused, pong = conn.read_frames(3)
        assert isinstance(hello, m.Hello)
        assert isinstance(refused, m.Reply) and not refused.ok and refused.error
        assert not refused.error.startswith("protocol error"), refused.error
        assert isinstance(pong, m.Reply) and pong.ok
    finally:
        conn.close()
    assert_healthy(d, base)
