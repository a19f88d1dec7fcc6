"""The access policy on rules (pure: host addresses and the loopback test are given) and roles."""

from __future__ import annotations

import ipaddress

import pytest

from mcrelay.ipc import messages as m
from mcrelay.policy import AccessPolicy, Destination, PolicyError, check
from mcrelay.rules import Output, Rule, RuleInput
from mcrelay.system.peers import Role, request_refusal

HOST = {ipaddress.IPv4Address("10.200.1.2"), ipaddress.IPv4Address("127.0.0.1")}


def rule(
    interface: str = "eth0", group: str = "239.1.1.1", port: int = 5000, *outputs: str
) -> Rule:
    outs = tuple(
        Output(group=g, port=int(p), interface=i)
        for g, p, i in (o.split(":") for o in (outputs or ("239.2.2.2:6000:eth1",)))
    )
    return Rule(id="r1", input=RuleInput(interface=interface, group=group, port=port), outputs=outs)


def refusal(policy: AccessPolicy, r: Rule) -> str | None:
    return policy.refusal(r, host_addresses=lambda: HOST, is_loopback=lambda name: name == "lo")


DEFAULT = AccessPolicy()


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        (rule("lo", "239.1.1.1"), "input interface lo is the loopback interface"),
        (rule("eth0", "127.0.0.53", 53), "input 127.0.0.53 is a loopback address"),
        (rule("eth0", "10.200.1.2"), "input 10.200.1.2 is an address of this host"),
        (rule("eth0", "239.1.1.1", 5000, "127.0.0.1:53:eth1"), "output 127.0.0.1:53 on eth1 is"),
        (rule("eth0", "239.1.1.1", 5000, "239.2.2.2:53:lo"), "uses the loopback interface"),
    ],
)
def test_default_policy_refuses_loopback_and_host_inputs(r: Rule, expected: str) -> None:
    reason = refusal(DEFAULT, r)
    assert reason is not None
    assert reason.startswith("rule r1 is refused by policy: ")
    assert expected in reason
    assert reason.count(".") <= 8 and "\n" not in reason  # one sentence


def test_default_policy_allows_everything_else() -> None:
    assert refusal(DEFAULT, rule("eth0", "239.1.1.1")) is None
    assert refusal(DEFAULT, rule("eth0", "10.200.9.9", 5000, "10.1.2.3:6000:eth2")) is None


def test_allow_loopback_and_host_input() -> None:
    loop = AccessPolicy(allow_loopback=True)
    assert refusal(loop, rule("lo", "127.0.0.53", 53, "127.0.0.1:53:lo")) is None
    assert "address of this host" in (refusal(loop, rule("eth0", "10.200.1.2")) or "")
    host = AccessPolicy.from_options(host_inputs=["10.200.1.2:5000%eth0"])
    assert refusal(host, rule("eth0", "10.200.1.2", 5000)) is None
    assert refusal(host, rule("eth0", "10.200.1.2", 5001)) is not None
    assert refusal(host, rule("eth1", "10.200.1.2", 5000)) is not None


def test_allow_lists_name_the_option() -> None:
    policy = AccessPolicy.from_options(
        input_interfaces=["eth0"], outputs=["239.0.0.0/8", "10.1.0.0/16:6000-6099%eth2"]
    )
    assert refusal(policy, rule("eth0", "239.1.1.1", 5000, "10.1.2.3:6050:eth2")) is None
    assert refusal(policy, rule("eth3")) == (
        "rule r1 is refused by policy: input interface eth3 is not in "
        "--allow-input-interface (eth0)"
    )
    assert refusal(policy, rule("eth0", "239.1.1.1", 5000, "10.1.2.3:7000:eth2")) == (
        "rule r1 is refused by policy: output 10.1.2.3:7000 on eth2 matches no --allow-output "
        "(239.0.0.0/8, 10.1.0.0/16:6000-6099%eth2)"
    )
    # Loopback stays refused even when an allow list would match it.
    wide = AccessPolicy.from_options(input_interfaces=["lo"], outputs=["0.0.0.0/0"])
    assert "--allow-loopback" in (refusal(wide, rule("lo")) or "")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("nonsense", "'nonsense' is not an IPv4 address or prefix"),
        ("10.0.0.0/33", "is not an IPv4 address or prefix"),
        ("10.0.0.0/8:0", "not a range within 1-65535"),
        ("10.0.0.0/8:9-8", "not a range within 1-65535"),
        ("10.0.0.0/8:x", "'x' is not a port"),
        ("10.0.0.0/8%", "an interface name must follow %"),
    ],
)
def test_bad_destinations_say_why(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match="--allow-output") as caught:
        Destination.parse(text, "--allow-output")
    assert why in str(caught.value)


def test_check_splits_and_reads_host_addresses_once() -> None:
    calls = []

    def addresses() -> set[ipaddress.IPv4Address]:
        calls.append(1)
        return HOST

    a = rule("eth0", "10.200.1.2")
    b = Rule(id="r2", input=RuleInput("eth0", "10.200.9.9", 5000), outputs=a.outputs)
    c = Rule(id="r3", input=RuleInput("eth0", "239.1.1.1", 5000), outputs=a.outputs)
    allowed, refused = check(
        DEFAULT, [a, b, c], host_addresses=addresses, is_loopback=lambda _: False
    )
    assert [r.id for r in allowed] == ["r2", "r3"]
    assert list(refused) == ["r1"] and "address of this host" in refused["r1"][1]
    assert calls == [1]


def test_readers_may_only_read() -> None:
    for request in (m.Ping(), m.ListWorkers(), m.ListRules(), m.GetStats(), m.LogLevel()):
        assert request_refusal(Role.READER, 1000, request, 50) is None
    added = request_refusal(Role.READER, 1000, m.AddRule(rule=rule()), 50)
    assert added == (
        "permission denied: uid 1000 may only read (the read group, gid 50); "
        "add needs root or the socket's group"
    )
    assert request_refusal(Role.READER, 1000, m.LogLevel(level="debug"), 50) is not None
    assert request_refusal(Role.READER, 1000, m.RestartWorker(id="data-0"), 50) is not None
    for role in (Role.ADMIN, Role.OPERATOR):
        assert request_refusal(role, 1000, m.AddRule(rule=rule()), 50) is None
