"""A SIGHUP reload against concurrent rule changes, with fake workers under a fake clock."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from mcrelay import config
from mcrelay.ipc import messages as m
from mcrelay.rules import Output, Rule, make_rule
from mcrelay.supervisor.core import Supervisor
from mcrelay.supervisor.main import reload_config, start_rules
from mcrelay.supervisor.persistence import RuleStore
from mcrelay.supervisor.settings import SupervisorSettings
from tests.harness import fakes
from tests.lab.fake_captures import NoCaptures


def rule(rule_id: str, n: int) -> Rule:
    return make_rule(
        interface="in0", group=f"239.1.1.{n}", port=5000, rule_id=rule_id,
        outputs=[Output("239.9.9.9", 6000, "out0")],
    )  # fmt: skip


async def test_a_reload_never_undoes_a_change_made_while_it_waited(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    conf = tmp_path / "rules.toml"
    conf.write_text(config.dump((rule("a", 1),)))
    store = RuleStore(tmp_path / "state")
    with trio.fail_after(600):
        async with trio.open_nursery() as fake_procs:
            sup = Supervisor(
                SupervisorSettings(num_workers=1),
                fakes.FakeLauncher(fake_procs),
                captures=NoCaptures(),
                store=store,
            )
            start_rules(sup, conf, config.load(conf))
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                await sup.wait_all_running()
                # Another change holds the table while the add and then the reload arrive.
                async with trio.open_nursery() as changes, sup.changes:
                    changes.start_soon(sup.execute, m.AddRule(rule=rule("x", 2)))
                    await trio.testing.wait_all_tasks_blocked()
                    changes.start_soon(reload_config, sup, conf)  # the unchanged file
                    await trio.testing.wait_all_tasks_blocked()
                # The add went first; the reload, decided after it, kept it.
                assert [r.id for r in sup.table.rules] == ["a", "x"]
                saved = store.load()
                assert saved is not None and [r.id for r in saved.rules] == ["a", "x"]
                nursery.cancel_scope.cancel()
            fake_procs.cancel_scope.cancel()
