"""Reply types: every result survives the wire, each request names its result type, and what
``--json`` prints keeps its field names and shapes (a public interface).
"""

from __future__ import annotations

import typing
from typing import Any

import msgspec
import pytest

from mcrelay.cli import top
from mcrelay.dataplane import parse
from mcrelay.errors import ProtocolError
from mcrelay.ipc import messages as m
from mcrelay.ipc import replies as r
from mcrelay.ipc import vocabulary
from mcrelay.rules import Output, Rule, RuleInput
from mcrelay.supervisor import states
from mcrelay.system import metrics

RULE = Rule(
    id="cam1",
    input=RuleInput(interface="in0", group="239.1.1.1", port=5000, vlan=7),
    outputs=(
        Output(group="239.10.1.1", port=5000, interface="out0"),
        Output(group="10.1.2.3", port=6000, interface="out1", ttl=32),
    ),
)
WORKER = r.WorkerInfo(
    id="data-0",
    kind="data",
    pid=123,
    state=r.WorkerState.RUNNING,
    restarts=2,
    rules=1,
    digest="abc",
    failed_rules=0,
    backoff_remaining_s=None,
    recent_failures=1,
    state_moved_aside="/var/lib/mcrelay/rules.json.bad",
)
STATS = r.Stats(
    rules=[
        r.RuleStats(
            id="cam1",
            packets_in=10,
            bytes_in=1000,
            pps_in=1.0,
            bps_in=800.0,
            outputs=[
                r.OutputStats(
                    output=str(RULE.outputs[1]),
                    packets=9,
                    bytes=900,
                    errors=1,
                    pps=1.0,
                    bps=720.0,
                )
            ],
        )
    ],
    drops={"no_rule": 4},
    kernel_drops=2**64 - 1,
    interval_s=1.0,
)
RESULTS: list[r.Result] = [
    r.Pong(protocol=m.PROTOCOL_VERSION),
    r.LogLevelIs("debug"),
    r.Restarted("data-0"),
    r.Workers([WORKER]),
    r.Rules([r.RuleInfo.of(RULE, r.RuleState.ACTIVE), r.RuleInfo.of(RULE, "failed", "data-0: no")]),
    r.Changed("cam1"),
    r.Changed("cam1", warning="not synced"),
    r.RulesReplaced(["a", "b"], ["b"]),
    r.RulesReplaced(["a"], [], dry_run=True),
    STATS,
]


@pytest.mark.parametrize("result", RESULTS, ids=lambda result: type(result).__name__)
def test_every_result_survives_the_wire(result: r.Result) -> None:
    wire = msgspec.msgpack.encode(m.Reply(ok=True, result=result))
    reply = msgspec.msgpack.decode(wire, type=m.ServerToClient)
    assert isinstance(reply, m.Reply)
    assert reply.result == result
    assert type(reply.result) is type(result)
    # Relayed by the control worker as it is.
    relayed = m.ControlReply(req_id=1, reply=reply)
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(relayed), type=m.SupervisorToWorker)
    assert back == relayed


def test_every_request_names_its_result_type() -> None:
    expected: list[tuple[m.ClientRequest, type[r.Result]]] = [
        (m.Ping(), r.Pong),
        (m.ListWorkers(), r.Workers),
        (m.AddRule(rule=RULE), r.Changed),
        (m.RemoveRule(id="cam1"), r.Changed),
        (m.ListRules(), r.Rules),
        (m.GetStats(), r.Stats),
        (m.LogLevel(), r.LogLevelIs),
        (m.RestartWorker(id="data-0"), r.Restarted),
        (m.ReplaceRules(rules=()), r.RulesReplaced),
    ]
    assert {type(request) for request, _ in expected} == set(typing.get_args(m.ClientRequest))
    for request, result_type in expected:
        assert m.result_type(request) is result_type


def _keys(value: Any) -> list[str]:
    assert isinstance(value, dict)
    return list(value)


def test_json_shapes_are_unchanged() -> None:
    """The field names (and order) ``--json`` has always printed."""
    (worker,) = r.public(r.Workers([WORKER]))
    assert _keys(worker) == [
        "id",
        "kind",
        "pid",
        "state",
        "restarts",
        "rules",
        "digest",
        "failed_rules",
        "backoff_remaining_s",
        "recent_failures",
        "state_moved_aside",
    ]
    assert worker["state"] == "running"
    active, failed = r.public(RESULTS[4])
    wire_rule = msgspec.msgpack.decode(msgspec.msgpack.encode(RULE))  # lists, not tuples
    assert active == {**wire_rule, "state": "active"}  # no reason when relayed
    assert failed == {**wire_rule, "state": "failed", "reason": "data-0: no"}
    stats = r.public(STATS)
    assert _keys(stats) == ["rules", "drops", "kernel_drops", "interval_s"]
    (rule,) = stats["rules"]
    assert _keys(rule) == ["id", "packets_in", "bytes_in", "pps_in", "bps_in", "outputs"]
    assert rule["outputs"] == [
        {
            "output": "10.1.2.3:6000:out1:32",
            "packets": 9,
            "bytes": 900,
            "errors": 1,
            "pps": 1.0,
            "bps": 720.0,
        }
    ]
    assert r.public(r.Pong(protocol=m.PROTOCOL_VERSION)) == {
        "pong": True,
        "protocol": m.PROTOCOL_VERSION,
    }
    assert r.public(r.Changed("cam1")) == {"id": "cam1"}
    assert r.public(r.Changed("cam1", "x")) == {"id": "cam1", "warning": "x"}
    assert r.public(r.RulesReplaced(["a"], ["b"])) == {"added": ["a"], "removed": ["b"]}
    assert r.public(r.RulesReplaced(["a"], [], dry_run=True)) == {
        "added": ["a"],
        "removed": [],
        "dry_run": True,
    }
    assert r.public(r.LogLevelIs("info")) == {"level": "info"}
    assert r.public(r.Restarted("data-0")) == {"id": "data-0"}


def test_a_listed_rule_gives_back_the_rule() -> None:
    info = r.RuleInfo.of(RULE, r.RuleState.REFUSED, "policy")
    assert info.rule == RULE
    assert type(info.rule) is Rule


def test_a_state_from_a_newer_daemon_still_decodes() -> None:
    wire = msgspec.msgpack.encode({**msgspec.to_builtins(WORKER), "state": "hibernating"})
    assert msgspec.msgpack.decode(wire, type=r.WorkerInfo).state == "hibernating"


def test_the_vocabularies_are_defined_once() -> None:
    assert states.WorkerState is vocabulary.WorkerState is r.WorkerState
    assert tuple(vocabulary.WorkerState) == metrics.WORKER_STATES
    assert tuple(vocabulary.RuleState) == metrics.RULE_STATES
    assert set(top.WORKER_STYLES) == set(vocabulary.WorkerState)
    assert set(top.RULE_STYLES) == set(vocabulary.RuleState)
    assert set(parse.DROP_REASONS) == set(vocabulary.DropReason)
    assert {d.label for d in parse.Drop} <= set(vocabulary.DropReason)
    assert set(metrics.DROP_REASONS) <= set(vocabulary.DropReason)


def test_a_result_of_another_type_is_a_protocol_error() -> None:
    assert m.result_of(m.GetStats(), m.Reply(ok=True, result=STATS)) is STATS
    with pytest.raises(ProtocolError, match="Ping answered with Stats, not Pong"):
        m.result_of(m.Ping(), m.Reply(ok=True, result=STATS))
    with pytest.raises(ProtocolError, match="answered with NoneType"):
        m.result_of(m.ListRules(), m.Reply(ok=True))
