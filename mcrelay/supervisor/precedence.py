"""The --config file against the saved table: which one the daemon runs with (pure).

The saved table records the digest and the rule ids of the config file's rules it was last made
from (its *seed*). At start and on SIGHUP:

- the file's rules have that digest: the saved table wins (every runtime change is kept);
- otherwise (the file was edited, or the table records no file): the file wins. The table
  becomes the file's rules; rules added at runtime (ids that neither the seed nor the file has)
  are dropped, or kept on top of the file's rules with ``keep_runtime``, except those with the
  input of one of the file's rules (a runtime rule with one of the file's ids is replaced by it).

See docs/configuration.md § "The config file and the saved table".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from mcrelay import rules as rules_mod
from mcrelay.rule_diff import RuleDiff
from mcrelay.rules import Rule

#: Rule ids named in a log line before the rest are only counted.
NAMED_IDS = 10


@dataclasses.dataclass(frozen=True)
class Seed:
    """What the saved table was last made from: the config file's rules, by digest and ids."""

    digest: str
    ids: tuple[str, ...]

    @classmethod
    def of(cls, rules: Iterable[Rule]) -> Seed:
        rules = tuple(rules)
        return cls(rules_mod.digest(rules), tuple(sorted(r.id for r in rules)))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The rule set to run with, the seed to record with it, and what to say about it."""

    rules: tuple[Rule, ...]
    seed: Seed
    #: The file's rules are those the table was made from: the table stays as it is.
    file_unchanged: bool
    #: The table recorded no seed at all (saved by an older mcrelay, or never from a file).
    no_seed: bool = False
    diff: RuleDiff = dataclasses.field(default_factory=RuleDiff)
    kept: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    #: Runtime rules dropped although kept by choice: their input is one of the file's.
    clashing: tuple[str, ...] = ()


def decide(
    file_rules: Sequence[Rule],
    table: Sequence[Rule],
    seed: Seed | None,
    *,
    keep_runtime: bool,
) -> Outcome:
    """The precedence above, for the config file's rules and the current (or saved) table."""
    new_seed = Seed.of(file_rules)
    if seed is not None and seed.digest == new_seed.digest:
        return Outcome(tuple(table), seed, file_unchanged=True)
    from_file = set(seed.ids if seed is not None else ()) | set(new_seed.ids)
    runtime = [r for r in table if r.id not in from_file]
    inputs = {r.match_key for r in file_rules}
    kept: list[Rule] = []
    clashing: list[str] = []
    if keep_runtime:
        for rule in runtime:
            if rule.match_key in inputs:
                clashing.append(rule.id)
            else:
                kept.append(rule)
                inputs.add(rule.match_key)
    result = tuple(sorted((*file_rules, *kept), key=lambda r: r.id))
    return Outcome(
        rules=result,
        seed=new_seed,
        file_unchanged=False,
        no_seed=seed is None,
        diff=RuleDiff.between(table, result),
        kept=tuple(r.id for r in kept),
        dropped=() if keep_runtime else tuple(r.id for r in runtime),
        clashing=tuple(clashing),
    )


def name_ids(ids: Sequence[str], limit: int = NAMED_IDS) -> str:
    """``a, b, c``; past ``limit`` ids, ``N: a, b, … and M more``."""
    if len(ids) <= limit:
        return ", ".join(ids)
    return f"{len(ids)}: {', '.join(ids[:limit])} and {len(ids) - limit} more"


def plural_rules(n: int) -> str:
    return f"{n} rule{'' if n == 1 else 's'}"


def describe(outcome: Outcome) -> str:
    """What the file changed in the table, in one clause list (for one log line)."""
    parts = []
    diff = outcome.diff
    dropped = set(outcome.dropped) | set(outcome.clashing)
    removed = [i for i in diff.removed if i not in dropped]
    if diff.added:
        parts.append(f"added {name_ids(diff.added)}")
    if removed:
        parts.append(f"removed {name_ids(removed)}")
    if diff.changed:
        parts.append(f"changed {name_ids(diff.changed)}")
    if outcome.kept:
        parts.append(
            f"kept {plural_rules(len(outcome.kept))} added at runtime: {name_ids(outcome.kept)}"
        )
    if outcome.dropped:
        parts.append(
            f"dropped {plural_rules(len(outcome.dropped))} added at runtime: "
            f"{name_ids(outcome.dropped)} (--keep-runtime-rules keeps such rules)"
        )
    if outcome.clashing:
        parts.append(
            f"dropped {plural_rules(len(outcome.clashing))} added at runtime (same input as a rule "
            f"of the file): {name_ids(outcome.clashing)}"
        )
    return "; ".join(parts) if parts else "nothing to change"
