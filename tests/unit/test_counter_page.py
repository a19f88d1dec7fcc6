"""The counter page: cells are reused (the page holds the table, not its history), counts made
before the page arrived move into it, and the supervisor reads back names from its table."""

from __future__ import annotations

from mcrelay.ipc import counter_page
from mcrelay.ipc.counter_page import Cells, drop_tag, output_tag, rule_tag
from mcrelay.rules import Output, Rule, RuleInput
from mcrelay.supervisor.counter_pages import CounterPages

RULE = Rule("a", RuleInput("in0", "239.1.1.1", 5000), (Output("239.9.9.9", 6000, "o"),))
OUT = str(RULE.outputs[0])


def test_churn_reuses_cells_and_counts_move_into_the_page() -> None:
    pages = CounterPages()
    cells = Cells()
    cells.cell(rule_tag("a"))[1] += 7  # before the page: private
    fd = pages.open("data-0", 1)
    assert fd is not None
    cells.attach(fd)
    assert cells.cell(rule_tag("a"))[1] == 7
    for n in range(1000):  # a rule added and removed a thousand times
        cells.cell(output_tag("a", f"x{n}"))[1] += 1
        cells.release(output_tag("a", f"x{n}"))
    cells.cell(output_tag("a", OUT))[1:] = memoryview(bytearray(b"\x03" + 23 * b"\0")).cast("Q")
    cells.cell(drop_tag("no_rule"))[1] += 2
    assert cells._words is not None and cells._words[0] == 3  # cells ever used
    final = pages.take("data-0", 1, [RULE])
    assert final is not None
    assert (final.rules["a"].packets_in, final.rules["a"].outputs[OUT].packets) == (7, 3)
    assert final.drops == {"no_rule": 2}
    assert pages.take("data-0", 1, [RULE]) is None  # read once, then unmapped


def test_out_of_bounds_cells_are_refused() -> None:
    pages = CounterPages()
    cells = Cells()
    fd = pages.open("data-0", 1)
    assert fd is not None
    cells.attach(fd)
    cells.cell(rule_tag("a"))[2] = 2**64 - 1
    cells.cell(output_tag("a", OUT))[1] = 5
    words = cells._words
    assert words is not None
    words[0] = 2**64 - 1
    page = pages._pages[("data-0", 1)]
    contents = counter_page.read(page)
    assert (contents.refused, contents.kernel_drops) == (1, 0)
    assert contents.cells == {output_tag("a", OUT): (5, 0, 0)}
    pages.close()
