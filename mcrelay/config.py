"""The config file: TOML, one ``[[rule]]`` table per rule, keys named like the CLI options.

    [[rule]]
    id = "camera-1"                # optional; default: a hash of interface, group, port
    input-interface = "eth0"
    input-group = "239.1.1.1"
    input-port = 5000
    input-source = "10.0.0.5"      # optional: relay only this sender's packets
    input-vlan = 100               # optional: frames tagged with this VLAN id; default untagged
    outputs = ["239.10.1.1:5000:eth1", "10.1.2.3:6000:eth2:32"]   # ADDR:PORT:IF[:TTL]

Loading is all or nothing: the first problem is reported with its line, and nothing is applied.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from mcrelay import rules as rules_mod
from mcrelay.errors import ConfigError, RuleError
from mcrelay.rules import MatchKey, Rule

_RULE_KEYS = {
    "id",
    "input-interface",
    "input-group",
    "input-port",
    "input-source",
    "input-vlan",
    "outputs",
}
_REQUIRED = ("input-interface", "input-group", "input-port", "outputs")
# Blanks before the header must not include newlines, or a match starts on the line above.
_RULE_HEADER = re.compile(r"""^[ \t]*\[\[[ \t]*(?:rule|"rule"|'rule')[ \t]*\]\]""", re.MULTILINE)


def parse(text: str, source: str = "<config>") -> tuple[Rule, ...]:
    """Rules from TOML text; ConfigError naming file, line and reason for the first problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise ConfigError(f"{source}: arrays or tables nested too deeply") from None
    unknown = set(doc) - {"rule"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    entries = doc.get("rule", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'rule' must be an array of tables ([[rule]])")
    lines = _header_lines(text)
    result: list[Rule] = []
    ids: set[str] = set()
    inputs: dict[MatchKey, str] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: rule {index + 1}"
        if index < len(lines):
            where += f" (line {lines[index]})"
        try:
            rule = _rule(entry)
        except RuleError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if rule.id in ids:
            raise ConfigError(f"{where}: duplicate rule id {rule.id!r}")
        if rule.match_key in inputs:
            raise ConfigError(
                f"{where}: same input as rule {inputs[rule.match_key]!r} "
                f"({rule.input.group}:{rule.input.port} on {rule.input.interface})"
            )
        ids.add(rule.id)
        inputs[rule.match_key] = rule.id
        result.append(rule)
    return tuple(result)


def _header_lines(text: str) -> list[int]:
    """Line number of each ``[[rule]]`` header, counting newlines once (linear in the file)."""
    lines, line, pos = [], 1, 0
    for match in _RULE_HEADER.finditer(text):
        line += text.count("\n", pos, match.start())
        pos = match.start()
        lines.append(line)
    return lines


def load(path: Path) -> tuple[Rule, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, str(path))


def _rule(entry: Any) -> Rule:
    if not isinstance(entry, dict):
        raise RuleError("each rule must be a table")
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        raise RuleError(f"unknown key(s): {', '.join(sorted(unknown))}")
    for key in _REQUIRED:
        if key not in entry:
            raise RuleError(f"missing key {key!r}")
    outputs = entry["outputs"]
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise RuleError("'outputs' must be a list of \"ADDR:PORT:IF[:TTL]\" strings")
    for key in ("id", "input-interface", "input-group", "input-source"):
        if key in entry and not isinstance(entry[key], str):
            raise RuleError(f"{key!r} must be a string")
    port = entry["input-port"]
    if not isinstance(port, int) or isinstance(port, bool):
        raise RuleError("'input-port' must be an integer")
    vlan = entry.get("input-vlan")
    if vlan is not None and (not isinstance(vlan, int) or isinstance(vlan, bool)):
        raise RuleError("'input-vlan' must be an integer")
    return rules_mod.make_rule(
        interface=entry["input-interface"],
        group=entry["input-group"],
        port=port,
        source=entry.get("input-source"),
        vlan=vlan,
        rule_id=entry.get("id"),
        outputs=[rules_mod.parse_output(o) for o in outputs],
    )


def dump(rules: tuple[Rule, ...]) -> str:
    """TOML text that ``parse`` turns back into exactly these rules."""
    chunks = ["# mcrelay rules (see docs/configuration.md)\n"]
    for rule in rules:
        lines = [
            "[[rule]]",
            f"id = {_toml_str(rule.id)}",
            f"input-interface = {_toml_str(rule.input.interface)}",
            f"input-group = {_toml_str(rule.input.group)}",
            f"input-port = {rule.input.port}",
        ]
        if rule.input.source is not None:
            lines.append(f"input-source = {_toml_str(rule.input.source)}")
        if rule.input.vlan is not None:
            lines.append(f"input-vlan = {rule.input.vlan}")
        outs = ", ".join(_toml_str(str(o)) for o in rule.outputs)
        lines.append(f"outputs = [{outs}]")
        chunks.append("\n".join(lines) + "\n")
    return "\n".join(chunks)


def _toml_str(text: str) -> str:
    """A TOML basic string. Not json.dumps' ASCII form: TOML refuses the surrogate-pair escapes
    it writes for characters beyond U+FFFF; but raw DEL must be escaped."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
