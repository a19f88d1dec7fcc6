"""Config files: round trip, and every problem named with its line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcrelay import config
from mcrelay.errors import ConfigError

GOOD = """
[[rule]]
id = "cam1"
input-interface = "eth0"
input-group = "239.1.1.1"
input-port = 5000
outputs = ["239.10.1.1:5000:eth1", "10.1.2.3:6000:eth2:32"]

[[rule]]
input-interface = "eth0"
input-group = "239.1.1.2"
input-port = 5000
input-source = "10.0.0.5"
outputs = ["239.10.1.2:5000:eth1"]

[[rule]]
id = "cam3"
input-interface = "eth0"
input-group = "239.1.1.2"
input-port = 5000
input-source = "10.0.0.5"
input-vlan = 200
outputs = ["239.10.1.3:5000:eth1"]
"""


def test_parse_and_round_trip() -> None:
    rules = config.parse(GOOD)
    assert rules[0].id == "cam1"
    assert rules[0].outputs[1].ttl == 32
    assert rules[1].input.source == "10.0.0.5"
    assert (rules[1].input.vlan, rules[2].input.vlan) == (None, 200)
    assert config.parse(config.dump(rules)) == rules


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]\n", "line 1"),
        ("colour = 1\n", "unknown top-level key"),
        ('[[rule]]\ninput-interface = "e"\n', "rule 1 \\(line 1\\): missing key"),
        (GOOD + '\n[[rule]]\nid = "x"\nbogus = 1\n', "rule 4 \\(line 25\\): unknown key"),
        (GOOD.replace("5000\noutputs", "70000\noutputs", 1), "outside 1-65535"),
        (
            GOOD.replace('"239.1.1.2"', '"239.1.1.1"', 1).replace(
                'input-source = "10.0.0.5"\n', 'id = "cam1"\n', 1
            ),
            "duplicate rule id",
        ),
        (GOOD.replace("input-port = 5000", 'input-port = "5000"', 1), "must be an integer"),
        (GOOD.replace("input-vlan = 200", 'input-vlan = "200"'), "'input-vlan' must be an integer"),
        (GOOD.replace("input-vlan = 200", "input-vlan = 5000"), "vlan: 5000 is outside 1-4094"),
        (GOOD.replace("input-vlan = 200\n", ""), "same input as rule"),
    ],
)
def test_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.parse(text, "f.toml")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_loads_or_fails_with_a_message(text: str) -> None:
    try:
        config.parse(text)
    except ConfigError as exc:
        message = str(exc)
        assert message
