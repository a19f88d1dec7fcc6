"""Rule validation, ids, digests and the master table."""

from __future__ import annotations

import pytest

from mcrelay.errors import RuleError
from mcrelay.rules import Output, default_rule_id, digest, make_rule, parse_output
from mcrelay.supervisor.rule_table import RuleTable


def mk(group: str = "239.1.1.1", port: int = 5000, **kw: object) -> object:
    outputs = kw.pop("outputs", [Output("239.2.2.2", 5000, "out0")])
    return make_rule(interface="in0", group=group, port=port, outputs=outputs, **kw)  # type: ignore[arg-type]


def test_default_id_is_stable_hash_of_input() -> None:
    r = mk()
    assert r.id == default_rule_id("in0", "239.1.1.1", 5000)  # type: ignore[attr-defined]
    assert r.id == mk().id  # type: ignore[attr-defined]
    assert r.id != mk(port=5001).id  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group": "239.1.1"}, "not an IPv4 address"),
        ({"group": "239.1.1.1\x00"}, "not an IPv4 address"),
        ({"group": "224.0.0.251"}, "link-local"),
        ({"port": 0}, "outside 1-65535"),
        ({"port": 70000}, "outside 1-65535"),
        ({"outputs": []}, "at least one output"),
        ({"outputs": [Output("239.1.1.1", 5000, "in0")]}, "loop"),
        ({"outputs": [Output("239.2.2.2", 5000, "o"), Output("239.2.2.2", 5000, "o")]}, "twice"),
        ({"outputs": [Output("239.2.2.2", 5000, "o", ttl=0)]}, "ttl"),
        ({"outputs": [Output("239.2.2.2", 5000, "bad/if")]}, "interface name"),
        ({"rule_id": "has space"}, "rule id"),
        ({"source": "239.9.9.9"}, "multicast"),
        ({"vlan": 0}, "vlan: 0 is outside 1-4094"),
        ({"vlan": 4095}, "outside 1-4094"),
        ({"vlan": True}, "outside 1-4094"),
    ],
)
def test_validation_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RuleError, match=message):
        mk(**kwargs)


def test_parse_output() -> None:
    assert parse_output("239.1.1.1:5000:eth0") == Output("239.1.1.1", 5000, "eth0")
    assert parse_output("10.0.0.1:6000:eth1:4").ttl == 4
    for bad in ("239.1.1.1:5000", "239.1.1.1:x:eth0", "a:b:c:d:e"):
        with pytest.raises(RuleError):
            parse_output(bad)


def test_digest_covers_outputs_and_ignores_order() -> None:
    a, b = mk(), mk(group="239.1.1.2")
    assert digest([a, b]) == digest([b, a])  # type: ignore[list-item]
    changed = mk(outputs=[Output("239.2.2.2", 5001, "out0")])
    assert digest([a]) != digest([changed])  # type: ignore[list-item]


def test_table_sequences_and_refuses_conflicts() -> None:
    table = RuleTable()
    a = mk()
    table.add(a)  # type: ignore[arg-type]
    assert table.seq == 1
    with pytest.raises(RuleError, match="already exists"):
        table.add(a)  # type: ignore[arg-type]
    with pytest.raises(RuleError, match="already relays"):
        table.add(mk(rule_id="other"))  # type: ignore[arg-type]
    with pytest.raises(RuleError, match="no rule"):
        table.remove("nope")
    assert table.seq == 1
    first_digest = table.digest
    table.remove(a.id)  # type: ignore[attr-defined]
    assert table.digest_at(1) == first_digest


def test_replace_applies_only_the_difference_and_is_atomic() -> None:
    table = RuleTable()
    keep, drop = mk(), mk(group="239.1.1.2")
    table.replace([keep, drop])  # type: ignore[list-item]
    new = mk(group="239.1.1.3")
    update = table.replace([keep, new])  # type: ignore[list-item]
    assert update.removed == (drop.id,)  # type: ignore[attr-defined]
    assert update.added == (new,)
    before = (table.seq, table.rules)
    with pytest.raises(RuleError):
        table.replace([keep, keep])  # type: ignore[list-item]
    assert (table.seq, table.rules) == before


@pytest.mark.parametrize("name", ["eth0\n", "eth\x000", "a b", "x/y", "e:1", "\x7f", "a" * 16, ""])
def test_interface_names_the_kernel_cannot_take_are_refused(name: str) -> None:
    with pytest.raises(RuleError, match="interface name"):
        mk(outputs=[Output("239.2.2.2", 5000, name)])


@pytest.mark.parametrize("rule_id", ["ok\n", "a\x00", "-x", "x" * 65])
def test_bad_ids_are_refused(rule_id: str) -> None:
    with pytest.raises(RuleError, match="rule id"):
        mk(rule_id=rule_id)


def test_empty_id_is_refused_not_defaulted() -> None:
    with pytest.raises(RuleError, match="rule id"):
        mk(rule_id="")


def test_a_vlan_is_part_of_the_input() -> None:
    """Ids and digests of rules without a VLAN are what they were before rules could name one
    (the values below were computed by mcrelay before); a VLAN makes another input."""
    plain = mk()
    assert plain.id == "r-d6dd2a017f"  # type: ignore[attr-defined]
    assert digest([plain]) == "365e1d4b45fd6c30"  # type: ignore[list-item]
    tagged = mk(vlan=200)
    assert tagged.id not in (plain.id, mk(vlan=201).id)  # type: ignore[attr-defined]
    assert digest([tagged]) != digest([mk(vlan=201)])  # type: ignore[list-item]
    table = RuleTable()
    table.add(plain)  # type: ignore[arg-type]
    table.add(tagged)  # type: ignore[arg-type]  # the same group:port, another VLAN
    with pytest.raises(RuleError, match="already relays"):
        table.add(mk(vlan=200, rule_id="again"))  # type: ignore[arg-type]
