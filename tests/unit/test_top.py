"""`mcrelay top`: frames rendered to a recording console, the poll loop against a fake daemon
under the autojump clock, and the command's validation through CliRunner (nothing is running).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import typer
from rich.console import Console, RenderableType
from rich.text import Text
from typer.testing import CliRunner

from mcrelay.cli.top import (
    Snapshot,
    View,
    format_bits,
    format_pps,
    render_frame,
    run_top,
    top_command,
    workers_table,
)
from mcrelay.errors import McrelayError
from tests.unit.test_metrics import RULES, STATS, WORKERS, rules_of, stats_of, workers_of

SOCKET = Path("/run/test/control.sock")
TWO_OUTPUTS: dict[str, Any] = {
    **RULES[0],
    "id": "r-d6dd2a017f",
    "state": "unresolved",
    "outputs": [
        {"group": "239.10.1.1", "port": 5000, "interface": "out0", "ttl": 16},
        {"group": "10.1.2.3", "port": 6000, "interface": "out0", "ttl": 32},
    ],
}


def text(renderable: RenderableType) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def rows(frame: str) -> list[str]:
    """The frame's lines with runs of spaces collapsed."""
    return [" ".join(line.split()) for line in frame.splitlines()]


def snapshot(**changes: Any) -> Snapshot:
    """A poll that answered these fixtures (in the shape ``--json`` prints them)."""
    answers = {"workers": WORKERS, "stats": STATS, "rules": RULES, **changes}
    return Snapshot(
        workers_of(answers["workers"]),
        stats_of(answers["stats"]),
        rules_of(answers["rules"]),
        at=0.0,
    )


def test_frame_shows_workers_rules_outputs_and_drops() -> None:
    frame = text(render_frame(View(SOCKET, 1.0, 0.0, snapshot())))
    assert f"mcrelay top  {SOCKET}" in frame
    assert "workers 1/2 running   rules 1 (1 paused)   in 1.0 pps 10.5 kbit/s" in frame
    lines = rows(frame)
    assert "ID KIND PID STATE RESTARTS RULES BACKOFF" in lines
    assert "control control 100 running 0 - -" in lines
    assert "data-0 data - backoff 3 - 1.50s" in lines
    assert "RULE STATE IN PPS IN RATE OUTPUT OUT PPS OUT RATE ERRORS" in lines
    assert "cam2 paused 1.0 10.5 kbit/s 239.10.1.2:5000:out0 1.0 9.48 kbit/s 1" in lines
    assert "drops: no_rule=4 outgoing=2   kernel drops: 7" in frame
    assert "unreachable" not in frame


def test_each_output_has_its_own_row() -> None:
    stats = {
        **STATS,
        "rules": [
            {
                "id": "r-d6dd2a017f",
                "packets_in": 0,
                "bytes_in": 0,
                "pps_in": 0.0,
                "bps_in": 0.0,
                "outputs": [
                    {"output": o, "packets": 0, "bytes": 0, "errors": 0, "pps": 0.0, "bps": 0.0}
                    for o in ("239.10.1.1:5000:out0", "10.1.2.3:6000:out0:32")
                ],
            }
        ],
    }
    frame = text(render_frame(View(SOCKET, 1.0, 0.0, snapshot(stats=stats, rules=[TWO_OUTPUTS]))))
    lines = rows(frame)
    first = "r-d6dd2a017f unresolved 0.0 0 bit/s 239.10.1.1:5000:out0 0.0 0 bit/s 0"
    assert first in lines
    assert "10.1.2.3:6000:out0:32 0.0 0 bit/s 0" in lines


def test_a_rule_without_counters_yet_lists_its_outputs() -> None:
    frame = text(render_frame(View(SOCKET, 1.0, 0.0, snapshot(rules=[*RULES, TWO_OUTPUTS]))))
    lines = rows(frame)
    assert "r-d6dd2a017f unresolved - - 239.10.1.1:5000:out0 - - -" in lines
    assert "10.1.2.3:6000:out0:32 - - -" in lines


def test_errors_that_grew_since_the_last_frame_stand_out() -> None:
    before = snapshot()
    stats = {**STATS, "rules": [{**STATS["rules"][0]}]}
    stats["rules"][0]["outputs"] = [{**STATS["rules"][0]["outputs"][0], "errors": 6}]
    frame = text(render_frame(View(SOCKET, 1.0, 1.0, snapshot(stats=stats), before)))
    assert "6 (+5)" in frame


def test_no_rules() -> None:
    stats = {"rules": [], "drops": {}, "kernel_drops": 0, "interval_s": 0.0}
    frame = text(render_frame(View(SOCKET, 1.0, 0.0, snapshot(stats=stats, rules=[]))))
    assert "rules: none" in frame
    assert "drops: none   kernel drops: 0" in frame


def test_states_are_coloured() -> None:
    table = workers_table(workers_of([{**WORKERS[1], "state": "fatal"}, WORKERS[0]]))
    states = list(table.columns[3].cells)
    assert isinstance(states[0], Text) and states[0].style == "bold red"
    assert isinstance(states[1], Text) and states[1].style == "green"


def test_daemon_down_keeps_the_last_data() -> None:
    view = View(
        SOCKET, 2.0, 10.0, snapshot(), error="mcrelay is not running (no daemon on X)", down_since=9
    )
    frame = text(render_frame(view))
    assert "daemon unreachable since" in frame
    assert "mcrelay is not running (no daemon on X); retrying every 2 s" in frame
    assert "last data from" in frame
    assert "data-0" in frame


def test_daemon_down_from_the_start() -> None:
    frame = text(render_frame(View(SOCKET, 1.0, 0.0, None, error="no daemon")))
    assert "no daemon; retrying every 1 s" in frame
    assert "workers" not in frame


@pytest.mark.parametrize(
    ("bps", "shown"),
    [
        (0.0, "0 bit/s"),
        (999.0, "999 bit/s"),
        (1000.0, "1.00 kbit/s"),
        (10528.0, "10.5 kbit/s"),
        (13_000_000.0, "13.0 Mbit/s"),
        (999_000_000.0, "999 Mbit/s"),
        (1.5e9, "1.50 Gbit/s"),
        (4e13, "40.0 Tbit/s"),
    ],
)
def test_format_bits(bps: float, shown: str) -> None:
    assert format_bits(bps) == shown


def test_format_pps() -> None:
    assert [format_pps(p) for p in (0.0, 9.94, 10.0, 1234.5)] == ["0.0", "9.9", "10", "1,234"]


async def test_loop_keeps_polling_through_failures(autojump_clock: trio.testing.MockClock) -> None:
    """Down, then hung, then up: every tick draws a frame; nothing escapes."""
    polls: list[float] = []

    async def fetcher(socket: Path) -> Snapshot:
        polls.append(trio.current_time())
        if len(polls) <= 2:
            raise McrelayError(f"mcrelay is not running (no daemon on {socket})")
        if len(polls) == 3:
            await trio.sleep_forever()
        return snapshot()

    out = io.StringIO()
    console = Console(file=out, width=120)
    start = trio.current_time()
    with trio.move_on_after(12.5):
        await run_top(SOCKET, 2.0, console, fetcher=fetcher)
    # Ticks every 2 s; the hung poll gives up after 5 s and the next tick comes at once.
    assert [round(t - start, 3) for t in polls] == [0, 2, 4, 9, 11]
    frames = out.getvalue().split("mcrelay top  ")[1:]
    assert len(frames) == 5
    assert "no daemon on" in frames[0] and "no daemon on" in frames[1]
    assert "did not answer within 5 s" in frames[2]
    assert "data-0" in frames[3] and "unreachable" not in frames[3]


def test_once_without_a_daemon(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("top")(top_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["top", "--once", "--socket", str(tmp_path / "none.sock")])
    assert result.exit_code == 1
    assert f"mcrelay: mcrelay is not running (no daemon on {tmp_path}/none.sock)" in result.output


def test_once_on_an_unusable_path(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("top")(top_command)
    app.command("other")(lambda: None)
    too_long = tmp_path / ("x" * 120)  # longer than sun_path: an OSError, not "not running"
    result = CliRunner().invoke(app, ["top", "--once", "--socket", str(too_long)])
    assert result.exit_code == 1
    assert f"mcrelay: cannot connect to {too_long}: " in result.output
    assert "Traceback" not in result.output


def test_interval_is_validated() -> None:
    app = typer.Typer()
    app.command("top")(top_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["top", "--interval", "0"])
    assert result.exit_code == 2
    assert "--interval" in result.output
