"""Counter pages on the supervisor's side: one per data-worker process, read once it is gone.

The supervisor makes each page (a memfd of `counter_page.PAGE_BYTES`, sealed so that its size
never changes: no reader can fault on it), keeps a read-only mapping, and hands the descriptor
to the worker. When the process has been reaped — a SIGKILL included — :meth:`CounterPages.take`
reads what it had counted and turns the cells back into counters of the rules in the table;
the stats book folds them into its retired totals. A page that cannot be made (EMFILE, ENOMEM)
is logged, and that process's counts are then retired from its last report, as without pages.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import mmap
import os
from collections.abc import Iterable

from mcrelay.dataplane.parse import DROP_REASONS
from mcrelay.ipc import counter_page
from mcrelay.ipc.counter_page import PAGE_BYTES, drop_tag, output_tag, rule_tag
from mcrelay.ipc.messages import OutputCounters, RuleCounters, StatsReport
from mcrelay.rules import Rule

log = logging.getLogger("mcrelay.supervisor")

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_DROP_TAGS = {drop_tag(reason): reason for reason in DROP_REASONS}


class CounterPages:
    def __init__(self) -> None:
        self._pages: dict[tuple[str, int], mmap.mmap] = {}

    def open(self, worker_id: str, pid: int) -> int | None:
        """A new page for process ``pid`` of ``worker_id``: its descriptor, which the caller
        sends and then closes; None (logged) when no page can be made."""
        try:
            fd = os.memfd_create(
                f"mcrelay-counters-{worker_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            )
        except OSError as exc:
            log.error("cannot make a counter page for %s: %s", worker_id, exc.strerror or exc)
            return None
        try:
            os.ftruncate(fd, PAGE_BYTES)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            page = mmap.mmap(fd, PAGE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as exc:
            os.close(fd)
            log.error("cannot make a counter page for %s: %s", worker_id, exc.strerror or exc)
            return None
        stale = self._pages.pop((worker_id, pid), None)
        if stale is not None:
            stale.close()
        self._pages[(worker_id, pid)] = page
        return fd

    def take(self, worker_id: str, pid: int, rules: Iterable[Rule]) -> StatsReport | None:
        """What process ``pid`` (reaped) had counted for ``rules``, and forget its page; None
        when it had none."""
        page = self._pages.pop((worker_id, pid), None)
        if page is None:
            return None
        try:
            contents = counter_page.read(page)
        finally:
            page.close()
        if contents.refused or contents.kernel_drops is None:
            log.warning(
                "worker %s (pid %d) left %d counters out of bounds in its counter page: ignored",
                worker_id,
                pid,
                contents.refused + (contents.kernel_drops is None),
            )
        return _as_report(contents, rules)

    def close(self) -> None:
        for page in self._pages.values():
            page.close()
        self._pages.clear()


@functools.lru_cache(maxsize=1 << 16)
def _tags(rule: Rule) -> tuple[int, tuple[tuple[str, int], ...]]:
    outputs = tuple((str(o), output_tag(rule.id, str(o))) for o in rule.outputs)
    return rule_tag(rule.id), outputs


def _as_report(contents: counter_page.PageContents, rules: Iterable[Rule]) -> StatsReport:
    """The page's cells as counters of ``rules``; cells naming nothing in them are ignored."""
    cells = contents.cells
    found: dict[str, RuleCounters] = {}
    for rule in rules:
        in_tag, output_tags = _tags(rule)
        outputs = {key: OutputCounters(*cells[tag]) for key, tag in output_tags if tag in cells}
        counts = cells.get(in_tag)
        if counts is None and not outputs:
            continue
        packets, size, _ = counts or (0, 0, 0)
        found[rule.id] = RuleCounters(packets, size, outputs)
    drops: dict[str, int] = {r: cells[tag][0] for tag, r in _DROP_TAGS.items() if tag in cells}
    kernel = contents.kernel_drops
    return StatsReport(rules=found, drops=drops, kernel_drops=kernel or 0)
