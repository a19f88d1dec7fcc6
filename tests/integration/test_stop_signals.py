"""Repeated stop signals: a second (or third) SIGTERM or SIGINT during the stop changes nothing.

One clean exit with status 0, the control socket removed, the saved table intact, and the
workers stopped in order (control first), each by its Stop message.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from mcrelay import rules as rules_mod
from mcrelay.ipc import messages as m
from mcrelay.rules import Rule
from tests.integration.test_wedge import Background, consistent, rule_set
from tests.lab.daemon import daemon
from tests.lab.stopping import assert_stopped_cleanly, saved_digest, stop_with

RULE = ["--input-interface", "in0", "--input-port", "5000", "--output", "239.9.9.9:6000:o"]
TERM, INT = signal.SIGTERM, signal.SIGINT


@pytest.mark.parametrize(
    "signals",
    [(TERM, TERM, TERM), (INT, INT, INT), (INT, TERM, INT), (TERM, INT)],
    ids=["3xTERM", "3xINT", "INT-TERM-INT", "TERM-INT"],
)
def test_repeated_stop_signals_give_one_clean_exit(
    tmp_path: Path, signals: tuple[signal.Signals, ...]
) -> None:
    with daemon(tmp_path, "--num-workers", "2") as d:
        for k in range(3):
            d.ok("add", "--input-group", f"239.1.1.{k + 1}", *RULE, "--id", f"r{k}")
        digest, _ = consistent(d) or ("", 0)
        assert digest
        workers = d.wait_running()
        status = stop_with(d, signals)
        assert_stopped_cleanly(d, status, workers, tmp_path / "state", digest)


def test_stop_signals_during_a_rule_change(tmp_path: Path) -> None:
    """A 1 MiB change in flight when the signals come is saved whole, or not at all."""
    before = rule_set("s", n=1, outputs=1)
    after = rule_set("s")
    with daemon(tmp_path, "--num-workers", "2") as d:
        d.ok("add", *rule_args(before[0]))
        workers = d.wait_running()
        load = Background(d.socket, m.ReplaceRules(rules=after))
        time.sleep(0.3)  # the load is on its way through the control worker and supervisor
        status = stop_with(d, (TERM, TERM, TERM))
        load.join(25)
        digest = saved_digest(tmp_path / "state")
        assert digest in (rules_mod.digest(before), rules_mod.digest(after))
        print("the change was", "saved" if digest == rules_mod.digest(after) else "not made")
        assert_stopped_cleanly(d, status, workers, tmp_path / "state", digest)


def rule_args(rule: Rule) -> list[str]:
    args = ["--id", rule.id, "--input-interface", rule.input.interface,
            "--input-group", rule.input.group, "--input-port", str(rule.input.port)]  # fmt: skip
    for out in rule.outputs:
        args += ["--output", f"{out.group}:{out.port}:{out.interface}"]
    return args
