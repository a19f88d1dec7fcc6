"""Rule files: whatever the text, ``config.parse`` returns valid rules or raises ConfigError whose
message names the source and, for a problem in one rule, "rule N" (and its line); never any
other exception.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from mcrelay import config
from mcrelay import rules as rules_mod
from mcrelay.errors import ConfigError, RuleError
from tests.unit.test_config import GOOD as GOOD_CONFIG

SOURCE = "fuzz.toml"
GOOD = GOOD_CONFIG.lstrip("\n")  # the valid file the unit tests use


def fuzz(examples: int) -> Any:
    return settings(
        deadline=None,
        max_examples=examples,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def outcome(text: str) -> tuple[Any, ...] | str:
    """The rules, or the ConfigError message; any other exception fails the test."""
    try:
        rules = config.parse(text, SOURCE)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{SOURCE}: "), message
        assert len(message) > len(SOURCE) + 2, message
        assert "Traceback" not in message
        return message
    for rule in rules:
        rules_mod.validate(rule)
        for name in (rule.id, rule.input.interface, *(o.interface for o in rule.outputs)):
            assert "\x00" not in name and "\n" not in name, rule
    assert config.parse(config.dump(rules), SOURCE) == rules  # what loads, saves and reloads
    return rules


# --- any text ----------------------------------------------------------------------------------


@fuzz(300)
@given(text=st.text())
@example(
    text="a = " + "[" * 5000 + "]" * 5000
)  # tomllib recursion: RecursionError, not ConfigError
@example(text="a = " + "{b = " * 3000 + "1" + "}" * 3000)
@example(text="[[rule]]\ninput-port = " + "[" * 5000 + "]" * 5000)
def test_any_text(text: str) -> None:
    outcome(text)


_toml_chars = st.sampled_from([*"[]{}=\".,'\n #\t:-_0123456789abcrule", "\\", "\x00"])


@fuzz(200)
@given(text=st.text(_toml_chars, max_size=200))
def test_toml_looking_text(text: str) -> None:
    outcome(text)


@fuzz(200)
@given(data=st.data())
def test_edits_of_a_valid_file(data: st.DataObject) -> None:
    """The documented example with a few characters inserted, deleted or replaced."""
    text = GOOD
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(text)), label="at")
        cut = data.draw(st.integers(0, 3), label="cut")
        new = data.draw(st.text(_toml_chars, max_size=3) | st.text(max_size=3), label="new")
        text = text[:at] + new + text[at + cut :]
    outcome(text)


# --- structured but wrong ----------------------------------------------------------------------


def toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise TypeError(value)


toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.datetimes()
    | st.dates()
    | st.times()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)

# Small pools, so that duplicate ids and duplicate inputs happen often.
IDS = st.sampled_from(["cam1", "cam2", "r-1", "x.y:z_0-9"])
INTERFACES = st.sampled_from(["eth0", "eth1", "in0"])
GROUPS = st.sampled_from(["239.1.1.1", "239.1.1.2", "10.0.0.9"])
PORTS = st.sampled_from([5000, 5001])
GOOD_OUTPUTS = st.sampled_from(["239.10.1.1:5000:eth1", "10.1.2.3:6000:eth2:32", "239.10.1.2:1:o"])
BAD_OUTPUTS = st.sampled_from(
    [
        "",
        "a:b",
        "239.10.1.1:x:eth1",
        "239.10.1.1:5000:eth1:999",
        "239.10.1.1:5000:eth1:0",
        "239.10.1.1:0:eth1",
        "239.10.1.1:65536:eth1",
        "1.2.3:5000:eth1",
        "224.0.0.1:5000:eth1",
        "0.0.0.0:5000:eth1",
        "239.10.1.1:5000:",
        "239.10.1.1:5000:eth1:16:extra",
        "239.10.1.1:5000:e\x00h",
        "239.10.1.1:5000:eth 1",
        "239.10.1.1:5000:eth1\n",
        "239.1.1.1:5000:eth0",  # the rule's own input, for the default rule
        "239.10.1.1:-1:eth1",
    ]
) | st.text(max_size=30)
BAD = {
    "id": st.sampled_from(["", "-x", "a" * 65, "a b", "a\x00", "a\n", "é"]) | st.text(max_size=8),
    "input-interface": st.sampled_from(["", "a b", "a/b", "a:b", "x" * 16, "a\x00b", "eth0\n"])
    | st.text(max_size=8),
    "input-group": st.sampled_from(["", "1.2.3", "224.0.0.5", "0.0.0.0", "::1", "239.1.1.1 "])
    | st.text(max_size=8),
    "input-source": st.sampled_from(["", "239.1.1.1", "1.2.3", "255.255.255.255"])
    | st.text(max_size=8),
    "input-port": st.sampled_from([0, -1, 65536, 2**63 - 1, -(2**63)]),
    "outputs": st.lists(BAD_OUTPUTS, min_size=0, max_size=3).map(lambda o: o or [])
    | st.lists(GOOD_OUTPUTS, min_size=65, max_size=66),
}
RULE_KEYS = ["id", "input-interface", "input-group", "input-port", "input-source", "outputs"]
REQUIRED = ["input-interface", "input-group", "input-port", "outputs"]


@st.composite
def rule_entries(draw: st.DrawFn) -> Any:
    entry: dict[str, Any] = {
        "input-interface": draw(INTERFACES),
        "input-group": draw(GROUPS),
        "input-port": draw(PORTS),
        "outputs": draw(st.lists(GOOD_OUTPUTS, min_size=1, max_size=2, unique=True)),
    }
    if draw(st.booleans()):
        entry["id"] = draw(IDS)
    if draw(st.booleans()):
        entry["input-source"] = "10.0.0.5"
    for _ in range(draw(st.integers(0, 2))):
        mutation = draw(st.sampled_from(["missing", "wrong-type", "bad-value", "unknown-key"]))
        if mutation == "missing":
            entry.pop(draw(st.sampled_from(REQUIRED)), None)
        elif mutation == "wrong-type":
            entry[draw(st.sampled_from(RULE_KEYS))] = draw(toml_values)
        elif mutation == "bad-value":
            key = draw(st.sampled_from(RULE_KEYS))
            entry[key] = draw(BAD[key])
        else:
            entry[draw(st.text(max_size=10).filter(lambda k: k not in RULE_KEYS))] = draw(
                toml_values
            )
    return entry


HEADERS = st.sampled_from(["[[rule]]", "[[ rule ]]", '[["rule"]]', "[['rule']]", "  [[rule]]"])


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, str, int, list[int]]:
    """(text, form, number of rule entries, line of each [[rule]] header)."""
    form = draw(st.sampled_from(["tables", "tables", "tables", "inline", "not-an-array", "extra"]))
    entries = draw(st.lists(rule_entries(), max_size=4))
    lines: list[str] = [draw(st.sampled_from(["", "# rules\n", "\n\n"]))]
    header_lines: list[int] = []
    if form == "extra":  # unknown top-level keys come first (after a table they would be in it)
        key = draw(st.text(max_size=8).filter(lambda k: k != "rule"))
        lines.append(f"{toml_string(key)} = {toml_value(draw(toml_values))}\n")
        form = "tables"
        extra = True
    else:
        extra = False
    if form == "tables":
        for entry in entries:
            lines.append(draw(st.sampled_from(["", "\n", "# next\n"])))
            header_lines.append("".join(lines).count("\n") + 1)
            lines.append(draw(HEADERS) + "\n")
            for key, value in entry.items():
                lines.append(f"{toml_string(key)} = {toml_value(value)}\n")
    elif form == "inline":
        items = [toml_value(e) for e in entries]
        if draw(st.booleans()):  # an element that is not a table
            items.insert(draw(st.integers(0, len(items))), toml_value(draw(toml_scalars)))
            entries = [*entries, "not a table"]
        lines.append(f"rule = [{', '.join(items)}]\n")
    else:
        lines.append(f"rule = {toml_value(draw(toml_scalars))}\n")
    return "".join(lines), ("extra" if extra else form), len(entries), header_lines


@fuzz(400)
@given(doc=documents())
def test_structured_but_wrong_documents(doc: tuple[str, str, int, list[int]]) -> None:
    text, form, count, header_lines = doc
    result = outcome(text)
    if form == "extra":
        assert isinstance(result, str) and "unknown top-level key" in result, result
        return
    if form == "not-an-array":
        assert isinstance(result, str) and "'rule' must be an array of tables" in result, result
        return
    if isinstance(result, tuple):
        assert len(result) == count
        return
    # Anything else is a problem in one rule: it is named, with its line when it has a header.
    found = re.match(rf"{re.escape(SOURCE)}: rule (\d+)( \(line (\d+)\))?: .+", result, re.DOTALL)
    assert found, result
    index = int(found.group(1))
    assert 1 <= index <= count, result
    if form == "tables":
        assert found.group(3) is not None, result
        assert int(found.group(3)) == header_lines[index - 1], (result, text)
    else:
        assert found.group(2) is None, result


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"input-interface": "a\x00b"}, "input interface"),
        ({"id": "cam\n"}, "rule id"),
        ({"outputs": ["239.10.1.1:5000:o\x00"]}, "output"),
    ],
)
def test_names_the_os_cannot_take_are_refused(entry: dict[str, Any], fragment: str) -> None:
    """NUL in an interface name crashes if_nametoindex (ValueError) in the workers."""
    base = {
        "input-interface": "eth0",
        "input-group": "239.1.1.1",
        "input-port": 5000,
        "outputs": ["239.10.1.1:5000:eth1"],
    }
    text = "[[rule]]\n" + "".join(
        f"{toml_string(k)} = {toml_value(v)}\n" for k, v in {**base, **entry}.items()
    )
    message = outcome(text)
    assert isinstance(message, str) and f"rule 1 (line 1): {fragment}" in message, message


# --- files -------------------------------------------------------------------------------------


@fuzz(100)
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_load_any_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "rules.toml"
    path.write_bytes(content)
    try:
        config.load(path)
    except ConfigError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith(f"{path}: "), message


def test_load_what_is_not_a_readable_file(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "missing.toml"):
        with pytest.raises(ConfigError, match=re.escape(f"{path}: cannot read")):
            config.load(path)


_name_chars = st.characters(
    exclude_characters="/:", exclude_categories=("Zs", "Zl", "Zp", "Cc", "Cs")
)


@fuzz(200)
@given(names=st.lists(st.text(_name_chars, min_size=1, max_size=15), min_size=2, max_size=2))
@example(names=["in😀", "out\x7f"])  # json.dumps wrote a surrogate pair TOML refuses
def test_dump_round_trips_every_valid_rule(names: list[str]) -> None:
    """`config save` output loads back to the same rules, whatever the interface names."""
    try:
        rule = rules_mod.make_rule(
            interface=names[0],
            group="239.1.1.1",
            port=5000,
            outputs=[rules_mod.Output(group="239.2.2.2", port=5000, interface=names[1])],
        )
    except RuleError:
        assume(False)
    assert config.parse(config.dump((rule,)), SOURCE) == (rule,)
