"""The --config file against the saved table, with real supervisors restarted on one state dir.

One precedence (docs/configuration.md § "The config file and the saved table"): the saved table
wins while the file's rules are those it was last made from; an edited file wins, at start and
on SIGHUP, with one log line naming what changed; rules added at runtime are dropped unless
``--keep-runtime-rules``; ``config load --dry-run`` only shows the difference; an unreadable
state file is moved aside, named, and the daemon starts anyway.
"""

from __future__ import annotations

import json
import re
import signal
import socket as pysocket
from pathlib import Path

import pytest

from tests.lab.daemon import Daemon, daemon, wait_for

OUT = ["--output", "239.9.9.9:6000:out0"]


def rule_text(rule_id: str, n: int, out: str = "239.9.9.9:6000:out0") -> str:
    return (
        f'[[rule]]\nid = "{rule_id}"\ninput-interface = "in0"\ninput-group = "239.1.1.{n}"\n'
        f'input-port = 5000\noutputs = ["{out}"]\n\n'
    )


def ids(d: Daemon) -> list[str]:
    return [r["id"] for r in json.loads(d.ok("rules", "--json"))]


def outputs(d: Daemon, rule_id: str) -> list[str]:
    (rule,) = [r for r in json.loads(d.ok("rules", "--json")) if r["id"] == rule_id]
    return [f"{o['group']}:{o['port']}:{o['interface']}" for o in rule["outputs"]]


def log_lines(d: Daemon, needle: str) -> list[str]:
    return [line for line in d.log.read_text().splitlines() if needle in line]


def add_runtime(d: Daemon, rule_id: str, n: int) -> None:
    d.ok("add", "--input-interface", "in0", "--input-group", f"239.1.2.{n}",
         "--input-port", "5000", *OUT, "--id", rule_id)  # fmt: skip


def test_edited_config_file_wins_at_restart_and_says_what_changed(tmp_path: Path) -> None:
    conf = tmp_path / "rules.toml"
    conf.write_text(rule_text("a", 1) + rule_text("b", 2) + rule_text("k", 3))
    with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
        assert ids(d) == ["a", "b", "k"]
        add_runtime(d, "x", 1)
    # Edit: a removed, b's output changed, c added, k untouched (a comment changes nothing).
    conf.write_text(
        "# edited\n" + rule_text("b", 2, "239.9.9.8:6000:out0") + rule_text("c", 4)
        + rule_text("k", 3)
    )  # fmt: skip
    with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
        assert ids(d) == ["b", "c", "k"]
        assert outputs(d, "b") == ["239.9.9.8:6000:out0"]
        assert d.wait_running()["data-0"]["rules"] == 3
        (line,) = log_lines(d, " changed since the saved table was made from it")
        print(line)
        assert "added c" in line and "removed a" in line and "changed b" in line
        assert "dropped 1 rule added at runtime: x (--keep-runtime-rules keeps" in line
        assert not re.search(r"\bk\b", line.split("made from it", 1)[1])  # k is unchanged
    # Restarted again with the same file: nothing changes, nothing is logged as changed.
    with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
        assert ids(d) == ["b", "c", "k"]
        assert not log_lines(d, " changed since")
        assert log_lines(d, "unchanged since the saved table was made from it")


def test_unchanged_file_keeps_a_runtime_rule_across_restarts(tmp_path: Path) -> None:
    conf = tmp_path / "rules.toml"
    conf.write_text(rule_text("a", 1))
    with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
        add_runtime(d, "x", 1)
        d.ok("remove", "a")  # a runtime removal of a file rule is a runtime change too
        add_runtime(d, "y", 2)
    conf.write_text(rule_text("a", 1) + "# a comment only\n")
    with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
        assert ids(d) == ["x", "y"]
        (line,) = log_lines(d, "unchanged since the saved table was made from it")
        print(line)
        assert "restored 2 rules" in line


def test_changed_file_with_keep_runtime_rules_keeps_runtime_rules(tmp_path: Path) -> None:
    conf = tmp_path / "rules.toml"
    conf.write_text(rule_text("a", 1))
    keep = ("--num-workers", "1", "--config", str(conf), "--keep-runtime-rules")
    with daemon(tmp_path, *keep) as d:
        add_runtime(d, "x", 1)
        add_runtime(d, "clash", 2)
    # The file now has a rule with the same input as the runtime rule 'clash': the file wins.
    conf.write_text(rule_text("a", 1, "239.9.9.7:6000:out0") + rule_text("b", 2)
                    + rule_text("f", 2).replace("239.1.1.2", "239.1.2.2"))  # fmt: skip
    with daemon(tmp_path, *keep) as d:
        assert ids(d) == ["a", "b", "f", "x"]
        assert d.wait_running()["data-0"]["rules"] == 4
        (line,) = log_lines(d, " changed since the saved table was made from it")
        print(line)
        assert "added b, f" in line and "changed a" in line
        assert "kept 1 rule added at runtime: x" in line
        assert "dropped 1 rule added at runtime (same input as a rule of the file): clash" in line


def test_sighup_applies_an_edit_and_names_the_runtime_rule_it_drops(tmp_path: Path) -> None:
    conf = tmp_path / "rules.toml"
    conf.write_text(rule_text("a", 1))
    with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
        d.wait_running()
        add_runtime(d, "x", 1)
        # An unchanged file: the reload keeps every runtime change, and says so.
        d.proc.send_signal(signal.SIGHUP)
        (kept,) = wait_for(lambda: log_lines(d, "SIGHUP:"))
        print(kept)
        assert "unchanged since the table was made from it" in kept
        assert ids(d) == ["a", "x"]
        conf.write_text(rule_text("a", 1) + rule_text("b", 2))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: ids(d) == ["a", "b"])
        (line,) = wait_for(lambda: log_lines(d, " changed since the table was made from it"))
        print(line)
        assert "added b" in line and "dropped 1 rule added at runtime: x" in line
        assert d.workers()["data-0"]["restarts"] == 0
    # And the restart after the reload keeps what the reload made.
    with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
        assert ids(d) == ["a", "b"]
        assert log_lines(d, "unchanged since")


def test_config_load_dry_run_shows_the_difference_and_changes_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "rules.toml"
    conf.write_text(rule_text("a", 1) + rule_text("b", 2) + rule_text("k", 3))
    with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
        before = d.ok("rules", "--json")
        state = (tmp_path / "state" / "rules.toml").read_bytes()
        new = tmp_path / "new.toml"
        new.write_text(rule_text("b", 2, "239.9.9.8:6000:out0") + rule_text("c", 4)
                       + rule_text("k", 3))  # fmt: skip
        text = d.ok("config", "load", str(new), "--dry-run")
        print(text)
        assert "dry run, nothing changed" in text
        assert "  add     c\n" in text and "  remove  a\n" in text and "  change  b\n" in text
        shown = json.loads(d.ok("config", "load", str(new), "--dry-run", "--json"))
        assert shown == {
            "file": str(new), "rules": 3, "dry_run": True, "added": ["c"], "removed": ["a"],
            "changed": ["b"], "unchanged": 1,
        }  # fmt: skip
        assert d.ok("rules", "--json") == before
        assert (tmp_path / "state" / "rules.toml").read_bytes() == state
        # The daemon's own checks answer the dry run: a rule the policy refuses fails it.
        refused = tmp_path / "lo.toml"
        refused.write_text(rule_text("b", 2).replace('"in0"', '"lo"'))
        result = d.cli("config", "load", str(refused), "--dry-run")
        assert result.returncode == 1 and "lo" in result.stderr, result.stderr
        assert d.ok("rules", "--json") == before
        # The real load then applies exactly what the dry run showed.
        applied = json.loads(d.ok("config", "load", str(new), "--json"))
        assert {**applied, "dry_run": True} == shown
        assert ids(d) == ["b", "c", "k"]


def _garbage(good: str) -> bytes:
    return b"\x00\xff\xfe garbage \xc1\x80" * 20


def _truncated(good: str) -> bytes:
    return good.encode()[: good.index("outputs") + 14]  # cut inside the outputs array


def _wrong_schema(good: str) -> bytes:
    return json.dumps({"rules": [{"id": "a"}]}).encode()  # JSON is not the state file's format


def _bad_rule(good: str) -> bytes:
    return good.replace("input-port = 5000", 'input-port = "x"').encode()


def _conflicting(good: str) -> bytes:
    return (good + good.replace('"s', '"t')).encode()  # two rules with the same input


@pytest.mark.parametrize("damage", [_garbage, _truncated, _wrong_schema, _bad_rule, _conflicting])
def test_an_unreadable_state_file_is_moved_aside_and_the_daemon_starts(
    tmp_path: Path, damage: object
) -> None:
    assert callable(damage)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    saved = "# mcrelay rules\n" + rule_text("s", 1).replace("239.1.1.1", "239.1.3.1")
    bad: bytes = damage(saved)
    (state / "rules.toml").write_bytes(bad)
    conf = tmp_path / "rules.toml"
    conf.write_text(rule_text("a", 1))
    with pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(10)
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        with daemon(tmp_path, "--num-workers", "1", "--config", str(conf), env=env) as d:
            seen = ""
            while "READY=1" not in seen:
                seen += notify.recv(4096).decode() + "\n"
            assert d.proc.poll() is None
            assert ids(d) == ["a"]
            (aside,) = state.glob("rules.toml.corrupt-*")
            assert aside.read_bytes() == bad  # kept as it was, never deleted
            (line,) = log_lines(d, "moved aside")
            print(line)
            assert str(aside) in line
            assert f"moved aside to {aside}" in seen  # systemd STATUS=
            workers = json.loads(d.ok("workers", "--json"))
            assert all(w["state_moved_aside"] == str(aside) for w in workers)
            assert str(aside) in d.ok("workers")
            # The new state file is the config file's, and the next start is a normal one.
            assert 'id = "a"' in (state / "rules.toml").read_text()
        with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
            assert ids(d) == ["a"]
            assert not log_lines(d, "moved aside")
            assert all(w["state_moved_aside"] is None for w in d.workers().values())
            assert len(list(state.glob("rules.toml.corrupt-*"))) == 1


def test_an_unreadable_state_file_without_config_starts_empty(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "rules.toml").write_bytes(b"[[rule]\n\xff")
    with daemon(tmp_path, "--num-workers", "1") as d:
        assert d.wait_running()
        assert ids(d) == []
        (aside,) = state.glob("rules.toml.corrupt-*")
        assert str(aside) in "\n".join(log_lines(d, "moved aside"))


def test_state_file_of_an_older_version_still_loads(tmp_path: Path) -> None:
    """A state file without the config digest (written before it was recorded) is read; the
    file's rules then win, since nothing says they were applied."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    old = rule_text("a", 1) + rule_text("x", 2)
    (state / "rules.toml").write_text("# mcrelay rules (see docs/configuration.md)\n" + old)
    with daemon(tmp_path, "--num-workers", "1") as d:
        assert ids(d) == ["a", "x"]  # no --config: the saved table, as before
    conf = tmp_path / "rules.toml"
    conf.write_text(rule_text("a", 1))
    with daemon(tmp_path, "--num-workers", "1", "--config", str(conf)) as d:
        assert ids(d) == ["a"]
        (line,) = log_lines(d, "records no config file")
        print(line)
        assert "dropped 1 rule added at runtime: x" in line
