"""Outputs on a missing interface are retried once a second without rebuilding the table.

Fake workers run the real data worker; the output interface `out0` never exists in the test's
namespace, and `open_output_socket` is wrapped to count the worker's attempts.
"""

from __future__ import annotations

import pytest
import trio

from mcrelay.ipc import messages as m
from mcrelay.rules import Output, make_rule
from mcrelay.worker import data
from tests.harness.test_lifecycle import running

OUTPUTS = 8


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    tried: list[str] = []
    real = data.open_output_socket

    def counted(interface: str, **kwargs: object) -> object:
        tried.append(interface)
        return real(interface, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(data, "open_output_socket", counted)
    return tried


async def test_a_table_on_a_missing_interface_costs_one_open_per_second_and_no_rebuild(
    autojump_clock: trio.abc.Clock, opens: list[str]
) -> None:
    outputs = [Output("239.9.9.9", 6000 + n, "out0") for n in range(OUTPUTS)]
    add = m.AddRule(rule=make_rule(interface="in0", group="239.1.1.1", port=5000, outputs=outputs))
    async with running() as (sup, launcher):
        await sup.wait_all_running()
        assert (await sup.execute(add)).ok
        impl = launcher.of("data-0")[0].impl
        assert impl is not None
        ((_, route),) = impl._routes.values()
        installed = route.outputs
        assert opens == ["out0"]  # eight outputs, one socket key, one attempt
        await trio.sleep(data.STATS_INTERVAL * 3.5)
        assert opens == ["out0"] * 4  # once per interval
        assert route.outputs is installed  # nothing rebuilt while the interface stays missing
