"""The supervisor's counter book keeps no more than the table and always encodes."""

from __future__ import annotations

import msgspec
import pytest
import trio

from mcrelay.ipc import messages as m
from mcrelay.rules import Output, Rule, RuleInput
from mcrelay.supervisor.stats import MAX_SHOWN, StatsBook


def _rule(rule_id: str) -> Rule:
    return Rule(rule_id, RuleInput("in0", "239.1.1.1", 5000), (Output("239.9.9.9", 6000, "o"),))


def _report(*ids: str, count: int = 1) -> m.StatsReport:
    out = {
        "239.9.9.9:6000:o": m.OutputCounters(count, count, 0),
        "10.9.9.9:1:x": m.OutputCounters(),
    }
    return m.StatsReport(
        rules={i: m.RuleCounters(count, count, dict(out)) for i in ids}, drops={"no_rule": count}
    )


async def test_counters_of_unknown_rules_and_outputs_are_not_kept() -> None:
    book = StatsBook()
    table = {"a": _rule("a")}
    book.record("data-0", 1, _report("a", "ghost-1", "ghost-2"), table)
    book.record("data-0", 2, _report("a"), table)  # a new process: the old one is retired
    merged = book.merged(table.values(), [])
    assert [r.id for r in merged.rules] == ["a"]
    assert merged.rules[0].packets_in == 2
    assert book._retired.rules.keys() == {"a"}
    assert book._retired.rules["a"].outputs.keys() == {"239.9.9.9:6000:o"}
    book.prune({})  # rule a removed: its retired counts go with it
    assert book._retired.rules == {}


async def test_sums_beyond_64_bits_are_capped_and_encode() -> None:
    book = StatsBook()
    table = {"a": _rule("a")}
    for pid in range(1, 8):  # seven processes, each at the largest count a worker may send
        book.record("data-0", pid, _report("a", count=m.MAX_COUNT), table)
    merged = book.merged(table.values(), [])
    assert merged.rules[0].bytes_in == MAX_SHOWN
    assert merged.drops["no_rule"] == MAX_SHOWN
    msgspec.msgpack.encode(merged)
    await trio.lowlevel.checkpoint()


def test_a_count_beyond_the_bound_does_not_decode() -> None:
    data = msgspec.msgpack.encode(_report("a", count=m.MAX_COUNT + 1))
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(data, type=m.WorkerToSupervisor)
