"""The --config file against the saved table (pure), and the seed the state file records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mcrelay import config
from mcrelay.rule_diff import RuleDiff
from mcrelay.rules import Rule, make_rule, parse_output
from mcrelay.supervisor.persistence import RuleStore, UnreadableState
from mcrelay.supervisor.precedence import Seed, decide, describe, name_ids


def rule(rule_id: str, n: int, out: str = "239.9.9.9:6000:o") -> Rule:
    return make_rule(
        interface="in0", group=f"239.1.1.{n}", port=5000, rule_id=rule_id,
        outputs=[parse_output(out)],
    )  # fmt: skip


A, B, C, X = rule("a", 1), rule("b", 2), rule("c", 3), rule("x", 9)


def test_an_unchanged_file_keeps_the_table_whatever_it_holds() -> None:
    seed = Seed.of([A, B])
    outcome = decide([B, A], [B, X], seed, keep_runtime=False)
    assert outcome.file_unchanged and outcome.rules == (B, X) and outcome.seed == seed


def test_a_changed_file_wins_and_drops_runtime_rules_unless_kept() -> None:
    seed = Seed.of([A, B])
    b2 = rule("b", 2, "239.9.9.8:6000:o")
    dropped = decide([b2, C], [A, B, X], seed, keep_runtime=False)
    assert not dropped.file_unchanged
    assert dropped.rules == (b2, C) and dropped.seed == Seed.of([b2, C])
    assert dropped.diff == RuleDiff(added=("c",), removed=("a", "x"), changed=("b",))
    assert dropped.dropped == ("x",) and dropped.kept == ()
    assert describe(dropped) == (
        "added c; removed a; changed b; dropped 1 rule added at runtime: x "
        "(--keep-runtime-rules keeps such rules)"
    )
    kept = decide([b2, C], [A, B, X], seed, keep_runtime=True)
    assert kept.rules == (b2, C, X) and kept.kept == ("x",)
    assert describe(kept) == "added c; removed a; changed b; kept 1 rule added at runtime: x"


def test_a_runtime_rule_with_a_file_rule_s_input_or_id_gives_way() -> None:
    seed = Seed.of([A])
    same_input = rule("y", 2)  # the input of the file's new rule b
    same_id = rule("b", 7)
    outcome = decide([A, B], [A, same_input], seed, keep_runtime=True)
    assert outcome.rules == (A, B) and outcome.clashing == ("y",)
    outcome = decide([A, B], [A, same_id], seed, keep_runtime=True)
    assert outcome.rules == (A, B) and outcome.diff.changed == ("b",) and not outcome.kept


def test_no_seed_the_file_wins_and_ids_not_in_it_count_as_runtime() -> None:
    outcome = decide([A], [A, X], None, keep_runtime=False)
    assert outcome.no_seed and outcome.rules == (A,) and outcome.dropped == ("x",)
    same = decide([A], [A], None, keep_runtime=False)
    assert not same.diff and describe(same) == "nothing to change"


def test_many_ids_are_counted() -> None:
    ids = [f"r{i:02}" for i in range(25)]
    assert name_ids(ids) == f"25: {', '.join(ids[:10])} and 15 more"
    assert name_ids(ids[:3]) == "r00, r01, r02"


def test_reply_diff_splits_changed_ids() -> None:
    diff = RuleDiff.from_reply(["b", "c"], ["a", "b"], total=3)
    assert diff == RuleDiff(added=("c",), removed=("a",), changed=("b",), unchanged=1)


def test_state_file_records_the_seed_and_reads_an_older_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = RuleStore(state)
    store.seed = Seed.of([A, B])
    store.save((A, X))
    text = (state / "rules.toml").read_text()
    assert config.parse(text) == (A, X)  # still a plain rule file, for config load/check
    again = RuleStore(state)
    loaded = again.load()
    assert loaded is not None and loaded.rules == (A, X) and loaded.seed == Seed.of([A, B])
    (state / "rules.toml").write_text(config.dump((A,)))  # as versions before the seed wrote
    older = RuleStore(state).load()
    assert older is not None and older.rules == (A,) and older.seed is None


def test_unreadable_state_files_are_moved_aside_never_replacing_a_name(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    store = RuleStore(state)
    moved = []
    for n, content in enumerate([b"\xff\xfe", b"[[rule]]\nid =", b'{"a": 1}']):
        (state / "rules.toml").write_bytes(content)
        with pytest.raises(UnreadableState):
            store.load()
        moved.append(store.move_aside())
        assert moved[-1].read_bytes() == content and not (state / "rules.toml").exists()
        assert len(set(moved)) == n + 1  # same second, distinct names
    assert all(p.name.startswith("rules.toml.corrupt-") for p in moved)


def test_a_symlink_at_the_state_path_is_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim.toml"
    victim.write_text(config.dump((A,)))
    (state / "rules.toml").symlink_to(victim)
    store = RuleStore(state)
    with pytest.raises(UnreadableState, match="symbolic link"):
        store.load()
    aside = store.move_aside()
    assert aside.is_symlink() and os.readlink(aside) == str(victim)
    assert victim.read_text() == config.dump((A,))
